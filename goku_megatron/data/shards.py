"""WebDataset shards: writing them (with DALI index files), reading them sample by sample, and
accounting for bad samples. docs/data.md describes the raw and latent formats.

A shard is a plain (uncompressed) tar whose members are named ``<key>.<ext>``; the members sharing
a key form one sample. Next to ``name.tar`` lies ``name.idx``, DALI's index for
``fn.readers.webdataset`` (not ``name.tar.idx``, which megatron-energon reads in its own format).

Reading never stops for one bad sample: a truncated tar yields its complete samples, a sample
without caption or media is skipped, and each distinct bad sample is counted once by kind in
``BadSamples``, with a log line naming the shard and the key (rate-limited). Nor for one bad
shard: a shard that cannot be opened or read (deleted, replaced, cut short or unreachable while
the run reads it) is tried READ_ATTEMPTS times with a doubling back-off, then given up for the
rest of the process with one log line; its samples are skipped and counted as unreadable_shard.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

log = logging.getLogger(__name__)

VIDEO_EXTS = ("mp4", "webm")
IMAGE_EXTS = ("jpg", "jpeg", "png")
LATENT_EXTS = ("latent.pth",)
CAPTION_EXT = "txt"
META_EXT = "json"
INDEX_SUFFIX = ".idx"

# Every kind of bad sample the readers and decoders skip; metrics.jsonl reports each as bad/<kind>.
BAD_KINDS = (
    "truncated_tar",  # the tar ends inside a member: its complete samples are still read
    "missing_caption",  # no .txt
    "missing_media",  # no clip, image or latent
    "corrupt_video",  # the container or stream does not decode
    "not_a_video",  # the bytes hold no video stream at all
    "zero_frames",  # a video stream without a decodable frame
    "unreadable_image",
    "unreadable_latent",  # latent.pth or t5.pth that torch.load cannot read
    "unreadable_shard",  # its shard could not be opened or read (READ_ATTEMPTS tries); key "*": not even listed
)
# Faults that are counted (bad/<kind>) but do not cost the sample: its metadata is advisory.
ADVISORY_KINDS = ("unreadable_json",)
# Skips logged one line each; after that, one summary line every LOG_EVERY skips.
LOG_FIRST = 20
LOG_EVERY = 1000
# A shard read that fails (OSError) is tried this often, READ_BACKOFF_S, then twice that, apart:
# long enough for a file server's hiccup, short enough that a vanished shard costs 1.5 s once.
READ_ATTEMPTS = 3
READ_BACKOFF_S = 0.5

T = TypeVar("T")


@dataclass
class BadSamples:
    """Distinct bad samples per kind, for the whole run.

    ``seen[kind]`` holds the distinct (shard, key) samples found bad in that way: the video and
    image streams listing one shard, every epoch's decode of the same clip and a resumed run
    (``load_state_dict``) do not add a sample again. ``attempts`` counts every skip. The first
    LOG_FIRST skips get one log line each naming shard and key; then one summary line every
    LOG_EVERY skips, so a data path full of bad samples cannot flood the log; a ``quiet`` one (a
    listing whose bad samples another counter holds) logs nothing.
    """

    attempts: int = 0
    seen: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    quiet: bool = False
    # Shards given up in this process (not in the state: a restart tries them again).
    unreadable_shards: set[str] = field(default_factory=set)

    @property
    def counts(self) -> Counter:
        """Distinct bad samples per kind."""
        return Counter({kind: len(keys) for kind, keys in self.seen.items()})

    def record(self, kind: str, shard: str | Path, key: str, detail: str = "", quiet: bool = False) -> None:
        """Count the skip of sample ``key`` of ``shard``; ``quiet``: without a log line."""
        if kind not in BAD_KINDS + ADVISORY_KINDS:
            raise ValueError(f"unknown bad-sample kind {kind!r}; expected one of {BAD_KINDS + ADVISORY_KINDS}")
        self.seen.setdefault(kind, set()).add((str(shard), key))
        self.attempts += 1
        if self.quiet or quiet:
            return
        what = "unreadable .json, sample kept" if kind in ADVISORY_KINDS else f"skipped bad sample ({kind})"
        if self.attempts <= LOG_FIRST:
            log.warning("%s: shard %s key %s%s%s", what, shard, key, f": {detail}" if detail else "",
                        "; from now on one summary line every %d skips" % LOG_EVERY if self.attempts == LOG_FIRST else "")
        elif self.attempts % LOG_EVERY == 0:
            log.warning("bad samples: %d skips so far, distinct by kind %s; last %s in shard %s key %s",
                        self.attempts, self.summary(), kind, shard, key)

    def record_unreadable_shard(self, shard: str | Path, key: str, error: OSError | None) -> None:
        """Count sample ``key`` of a shard that could not be read. The first time a shard fails
        (``error``: its last error), one line names it whatever the rate limit, and the shard is
        given up for this process; its later samples are counted without a line."""
        first = str(shard) not in self.unreadable_shards
        self.unreadable_shards.add(str(shard))
        self.record("unreadable_shard", shard, key, quiet=True)
        if first and not self.quiet:
            log.warning("shard %s cannot be read (%s: %s, %d tries over %.1f s): its samples are skipped and counted "
                        "as bad/unreadable_shard", shard, type(error).__name__, error, READ_ATTEMPTS,
                        READ_BACKOFF_S * (2 ** (READ_ATTEMPTS - 1) - 1))

    def is_bad(self, shard: str | Path, key: str) -> bool:
        """Whether this sample was skipped before (an advisory fault does not make it bad)."""
        return any((str(shard), key) in self.seen.get(kind, ()) for kind in BAD_KINDS)

    def summary(self) -> str:
        """Distinct counts of the kinds seen, e.g. ``corrupt_video=3, missing_caption=1``."""
        return ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()) if v) or "none"

    def as_metrics(self) -> dict[str, int]:
        """Cumulative distinct counts for metrics.jsonl, every kind present (0 when none)."""
        return {f"bad/{kind}": len(self.seen.get(kind, ())) for kind in BAD_KINDS + ADVISORY_KINDS}

    def state_dict(self) -> dict[str, list[list[str]]]:
        """The bad samples found so far, by kind: a resumed run counts none of them again."""
        return {kind: sorted(map(list, keys)) for kind, keys in self.seen.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for kind, keys in state.items():
            if isinstance(keys, list):  # states saved before distinct counting hold bare counts
                self.seen.setdefault(kind, set()).update((shard, key) for shard, key in keys)


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the member path up to the first dot of its basename."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def write_dali_index(tar_path: Path) -> Path | None:
    """Writes ``name.idx`` with DALI's own indexer (wds2idx, shipped in the DALI wheel); returns
    None without DALI, whose webdataset reader is then unused (or indexes on the fly)."""
    try:
        from wds2idx import IndexCreator
    except ImportError:
        return None
    index = Path(tar_path).with_suffix(INDEX_SUFFIX)
    with IndexCreator(str(tar_path), str(index), verbose=False) as creator:
        creator.create_index()
    return index


class ShardWriter:
    """Writes samples into numbered shards of at most ``samples_per_shard`` samples.

    Each shard is written under a temporary name and renamed when complete (then indexed), so an
    interrupted writer never leaves a partial shard under a final name. Members get mtime 0 and
    sorted extensions, so the same samples give byte-identical shards.
    """

    def __init__(self, out_dir: Path, prefix: str = "shard", samples_per_shard: int = 1000,
                 first_shard: int = 0, index: bool = True) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.index = index
        self.next_shard = first_shard
        self.written: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def shard_path(self, number: int) -> Path:
        return self.out_dir / f"{self.prefix}-{number:05d}.tar"

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Adds one sample: ``members`` maps extensions (``"mp4"``, ``"txt"``, ...) to bytes."""
        if "." in key.rpartition("/")[2]:
            raise ValueError(f"sample key {key!r} contains a dot; WebDataset keys end at the first dot")
        if self._tar is None:
            self._tmp = self.shard_path(self.next_shard).with_suffix(f".tar.tmp{os.getpid()}")
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(members[ext])
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(members[ext]))
        self._count += 1
        if self._count == self.samples_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        final = self.shard_path(self.next_shard)
        os.replace(self._tmp, final)
        if self.index:
            write_dali_index(final)
        self.written.append(final)
        self.next_shard += 1
        self._tar, self._tmp, self._count = None, None, 0

    def close(self) -> list[Path]:
        """Finishes the last (partial) shard; returns every shard written."""
        if self._tar is not None:
            self._finish_shard()
        return self.written

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # keep no partial shard
            self._tar.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's members lie in its shard: extension -> (offset, size)."""

    shard: str
    key: str
    members: dict[str, tuple[int, int]]


def list_samples(shard: Path, bad: BadSamples) -> list[SampleRef]:
    """The complete samples of a shard in tar order, from the tar headers alone (no data read).

    A tar cut short keeps the samples whose members all lie before the cut; the sample that was
    cut, and any sample without caption or media, is recorded in ``bad`` and left out. A shard
    that cannot be read lists no sample (recorded as unreadable_shard, key "*").
    """
    try:
        size, groups, error = with_retries(lambda: _read_headers(shard))
    except OSError as err:
        bad.record_unreadable_shard(shard, "*", err)
        return []
    if error:
        # The cut may have removed later members of the last sample read, so it is dropped too.
        cut = groups.popitem()[0] if groups else "(none)"
        bad.record("truncated_tar", shard, cut, f"{size} bytes, {error}")
    refs = []
    media_exts = VIDEO_EXTS + IMAGE_EXTS + LATENT_EXTS
    for key, members in groups.items():
        if not any(ext in members for ext in media_exts):
            bad.record("missing_media", shard, key, f"members {sorted(members)}")
        elif CAPTION_EXT not in members:
            bad.record("missing_caption", shard, key)
        else:
            refs.append(SampleRef(str(shard), key, members))
    return refs


def _read_headers(shard: Path) -> tuple[int, dict[str, dict[str, tuple[int, int]]], str]:
    """(file size, members per key, why the tar is cut short or "") from the tar headers; OSError
    when the shard cannot be opened or read."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    size = shard.stat().st_size
    end = 0  # where the last complete member's data (padded to 512-byte blocks) ends
    error = ""
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.offset_data + member.size > size:
                    error = f"member {member.name} ends past the end of the file"
                    break
                end = member.offset_data + -(-member.size // 512) * 512
                if member.isfile():
                    key, ext = split_key(member.name)
                    groups.setdefault(key, {})[ext] = (member.offset_data, member.size)
    except tarfile.ReadError as e:  # a header cut in half or overwritten
        error = str(e)
    if not error:  # tarfile stops quietly at a cut header; a complete tar ends in zero blocks
        with open(shard, "rb") as f:
            f.seek(end)
            trailer = f.read(1024)
        if len(trailer) < 1024 or trailer.strip(b"\0"):
            error = f"no end-of-archive marker after byte {end}"
    return size, groups, error


def read_sample(ref: SampleRef) -> dict[str, Any]:
    """The sample's bytes per extension plus ``__key__`` and ``__url__`` (WebDataset's layout).
    OSError when the shard cannot be opened, or ends before a member its listing found (it was
    cut short or replaced since)."""
    sample: dict[str, Any] = {"__key__": ref.key, "__url__": ref.shard}
    with open(ref.shard, "rb") as f:
        for ext, (offset, size) in ref.members.items():
            f.seek(offset)
            sample[ext] = f.read(size)
            if len(sample[ext]) != size:
                raise OSError(f"{ref.shard} ends inside member {ref.key}.{ext}, which its listing found: "
                              "cut short or replaced since")
    return sample


def with_retries(read: Callable[[], T]) -> T:
    """``read()``, tried READ_ATTEMPTS times while it raises OSError, with a doubling back-off
    from READ_BACKOFF_S; the last OSError is raised."""
    for attempt in range(READ_ATTEMPTS - 1):
        try:
            return read()
        except OSError:
            time.sleep(READ_BACKOFF_S * 2 ** attempt)
    return read()


def read_sample_or_skip(ref: SampleRef, bad: BadSamples) -> dict[str, Any] | None:
    """``read_sample`` that never stops the run for a shard it cannot read: after READ_ATTEMPTS
    tries (at once for a shard already given up) the sample is counted as unreadable_shard and
    None returned, like any bad sample."""
    if ref.shard in bad.unreadable_shards:
        bad.record_unreadable_shard(ref.shard, ref.key, None)
        return None
    try:
        return with_retries(lambda: read_sample(ref))
    except OSError as err:
        bad.record_unreadable_shard(ref.shard, ref.key, err)
        return None


def find_shards(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shards named by a directory (all ``*.tar`` in it, sorted), a file, or a list of either."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    shards: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            shards.extend(sorted(p.glob("*.tar")))
        elif p.is_file():
            shards.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such shard or directory; check data.path")
    if not shards:
        raise FileNotFoundError(f"no *.tar shards in {path}; build them with goku-data prepare-shards")
    return shards
