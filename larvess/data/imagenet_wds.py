"""Training reader of the ImageNet(-21K) WebDataset shards written by imagenet_shards.py.

A sample has `__key__`, `jpg`, `cls` (index into info.json's synset list) and `json` (member
names: shard_format.py); the reader yields {"image", "labels": LongTensor([vocabulary row]),
"key", "lost", "lost_shards"} from an infinite resampled stream.

Lost data: a shard that cannot be opened or read to its end (truncated, damaged, gone) is
reported by webdataset's handler, which here counts and continues with the next shard; a shard
that ends quietly before the sample count info.json gives it (tarfile stops without an error at
a cut on a 512-byte block boundary or inside a header) is counted too, as is a sample that
cannot be decoded. `lost` (int) is the number of samples lost since the previous
sample this (rank, worker) stream yielded: for a shard read, the samples info.json plans for it
(in this stream's share) minus those read, so a truncated tar counts everything after the cut
(0 when info.json does not know the shard's length: then the event still names the shard);
an undecodable sample counts 1. `lost_shards` lists the shard file names of those events. The
counts travel with the samples because the reader runs in DataLoader worker processes;
mixing.collate sums them per batch.

Where the shards are (`root`), and where their info.json is read from (`info`, default derived):

- a local folder: `shards/in21k` -> shards/in21k/<filename> for each shard of
  shards/in21k/info.json;
- a URL prefix without braces: `file:///data/in21k`, `https://host/in21k/` ->
  <prefix>/<filename>, info at <prefix>/info.json;
- a shard pattern with webdataset's brace expansion, a path, URL or `pipe:` command:
  `pipe:aws s3 cp s3://bucket/in21k/imagenet-{000000..014000}.tar -`,
  `https://host/in21k/imagenet-{000000..000099}.tar`. The expanded list may be all of the
  shards or a subset: each expanded URL must contain the file name of one shard listed in
  info.json (that gives its sample count). info.json is read from the same pattern with the
  braced file name replaced by `info.json` (`pipe:aws s3 cp s3://bucket/in21k/info.json -`),
  unless `info=` names it (a path, URL or pipe: command).

URLs and pipe: commands are opened with webdataset's gopen (curl for http(s), the shell for
pipe:), for info.json as for the shards.

Reader protocol (shared by every dataset reader): `class_names` (display name + synonyms per
local class, from the lemma file `names_file`; default timm's imagenet_synset_to_lemma.txt),
`wnids` (the shards' synset list) and `set_rows(rows)` (local class -> vocabulary row).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import multiprocessing as mp
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from larvess.data.shard_format import CLS, INFO_FILE, JPG
from larvess.data.transforms import normalize
from larvess.names import read_synset_lemmas

log = logging.getLogger(__name__)
_BRACED = re.compile(r"[^/\s'\"]*\{[^}]*\}[^/\s'\"]*")  # the braced file name of a pattern


def timm_lemma_file() -> Path:
    """timm's WordNet lemma table of the ImageNet-21K synsets (found without importing timm)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("timm is not installed: pass names_file (wnid<TAB>lemma lines)")
    return (
        Path(spec.submodule_search_locations[0]) / "data" / "_info" / "imagenet_synset_to_lemma.txt"
    )


def _is_url(root: str) -> bool:
    return root.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", root) is not None


def read_text(url: str) -> str:
    """A local path, URL or pipe: command's bytes as text (errors name the URL)."""
    if not _is_url(url):
        path = Path(url)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} missing: write shards with scripts/shard_imagenet21k.py"
            )
        return path.read_text()
    try:
        with wds.gopen(url) as f:
            data = f.read()
    except Exception as e:  # gopen raises what curl, the shell or open raise
        raise FileNotFoundError(f"cannot read {url}: {e}") from e
    if not data:
        raise FileNotFoundError(f"cannot read {url}: no data (does it exist?)")
    return data.decode()


def resolve_shards(root: str | Path, info: str | Path | None = None) -> tuple[dict, str, list]:
    """(info dict, where it was read, [(shard url, num_samples)]) for a root (module docstring)."""
    root_s = str(root)
    braced = _BRACED.search(root_s)
    if braced:
        info_url = str(info) if info is not None else (
            root_s[: braced.start()] + INFO_FILE + root_s[braced.end() :]
        )  # fmt: skip
    elif root_s.startswith("pipe:"):
        raise ValueError(
            f"pipe: root {root_s!r} has no shard pattern: write the shard file name with braces, "
            "e.g. 'pipe:aws s3 cp s3://bucket/in21k/imagenet-{000000..014000}.tar -'"
        )
    elif _is_url(root_s):
        info_url = str(info) if info is not None else root_s.rstrip("/") + "/" + INFO_FILE
    else:
        if not Path(root_s).is_dir() and info is None:
            raise FileNotFoundError(f"shard folder {root_s} not found")
        info_url = str(info) if info is not None else str(Path(root_s) / INFO_FILE)
    try:
        meta = json.loads(read_text(info_url))
        shards = meta["shards"]
        lengths = {s["filename"]: int(s["num_samples"]) for s in shards}
        synsets = meta["synsets"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{info_url}: not a shard info.json ({type(e).__name__}: {e})") from e
    if not isinstance(synsets, list) or not all(isinstance(w, str) for w in synsets):
        raise ValueError(f"{info_url}: 'synsets' must be a list of wnids")
    if braced:
        urls = []
        for u in wds.shardlists.expand_urls(root_s):
            hits = [f for f in re.findall(r"[^/\s'\"]+\.tar", u) if f in lengths]
            if not hits:
                raise ValueError(
                    f"{u}: names none of the {len(lengths)} shards of {info_url} "
                    f"(e.g. {shards[0]['filename'] if shards else '-'})"
                )
            urls.append((u, lengths[hits[-1]]))
    else:
        base = root_s.rstrip("/") if _is_url(root_s) else None
        urls = [(f"{base}/{f}" if base else str(Path(root_s) / f), n) for f, n in lengths.items()]
    return meta, info_url, urls


def _stream_of_process(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(global stream, number of streams) over (rank, dataloader worker)."""
    if rank is None or world_size is None:
        dist = torch.distributed
        ok = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if ok else (0, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    wi = get_worker_info()
    w, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
    return rank * nw + w, world_size * nw


class ImageNetShards(IterableDataset):
    """Infinite resampled stream of {"image": float32 [3,H,W], "labels": LongTensor([row]), "key"}.

    root: shard folder, URL prefix or brace pattern (module docstring); info: where info.json is
    (default: derived from root). Shards are split across the (rank, worker) streams first, then
    resampled within each stream's subset, so different processes and workers see disjoint
    samples. With fewer shards than streams every stream reads all shards and keeps sample i of a
    shard where i % n_streams == stream.
    rows / set_rows: LongTensor [num_classes] cls -> vocabulary row; iterating before rows are
    set is a RuntimeError (pass torch.arange(num_classes) for the shards' own class ids); samples
    whose row is negative (class not in the vocabulary) are dropped. A `cls` outside the synset
    list is a ValueError naming the shard, the key and the value. transform(image PIL RGB,
    None, rng) -> (tensor [3,H,W], None); None = normalise at full size. Set `.seed` before
    iterating to reseed (mixing does this for resumption). Lost data (module docstring) rides
    on the samples as "lost" / "lost_shards"; undecodable samples are also counted in
    `.num_corrupt` (shared with the loader's workers).
    names_file: "wnid<TAB>lemma, ..." lines giving `class_names`; read now when given (a synset
    without a line is a ValueError), else timm's file is read at the first use of class_names.
    """

    def __init__(
        self,
        root: str | Path,
        rows: torch.Tensor | None = None,
        transform: Callable | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_buffer: int = 1000,
        info: str | Path | None = None,
        names_file: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.root = root if isinstance(root, str) and _is_url(root) else Path(root)
        meta, self.info_url, urls = resolve_shards(root, info)
        self.synsets: list[str] = meta["synsets"]
        self.num_samples: int = sum(n for _, n in urls)
        self.urls = [u for u, n in urls if n]
        self.lengths: dict[str, int] = dict(urls)  # samples info.json plans per shard url
        if not self.urls:
            raise ValueError(f"{root}: no non-empty shards (info: {self.info_url})")
        self.names_file = names_file
        self._class_names = None if names_file is None else self._read_class_names()
        self._rows: torch.Tensor | None = None
        self.rows = rows
        self.transform = transform
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self._corrupt = mp.get_context("fork").Value("q", 0)

    @property
    def wnids(self) -> list[str]:
        """WordNet ids of the local classes (the shards' synset list)."""
        return self.synsets

    @property
    def class_names(self) -> list[list[str]]:
        """[display name, synonym, ...] per local class, from the lemma file."""
        if self._class_names is None:
            self._class_names = self._read_class_names()
        return self._class_names

    def _read_class_names(self) -> list[list[str]]:
        path = Path(self.names_file) if self.names_file is not None else timm_lemma_file()
        if not path.is_file():
            raise FileNotFoundError(f"lemma file not found: {path}")
        lemmas = read_synset_lemmas(path)
        missing = [w for w in self.synsets if w not in lemmas]
        if missing:
            raise ValueError(
                f"{path}: no lemma for {len(missing)} of the {len(self.synsets)} synsets of "
                f"{self.info_url}, e.g. {missing[:5]}; pass names_file with wnid<TAB>lemma lines"
            )
        return [lemmas[w] for w in self.synsets]

    @property
    def rows(self) -> torch.Tensor | None:
        return self._rows

    @rows.setter
    def rows(self, rows: torch.Tensor | None) -> None:
        if rows is not None:
            self.set_rows(rows)
        else:
            self._rows = None

    def set_rows(self, rows: torch.Tensor) -> None:
        """Local class -> vocabulary row mapping used for the labels (negative = drop)."""
        rows = torch.as_tensor(rows)
        if rows.dim() != 1 or len(rows) != len(self.synsets) or rows.is_floating_point():
            raise ValueError(
                f"rows must be a LongTensor [{len(self.synsets)}] (one per synset of "
                f"{self.info_url}), got {rows.dtype} of shape {tuple(rows.shape)}"
            )
        self._rows = rows.long()

    def set_seed(self, seed: int) -> None:
        """Reseed the stream (takes effect at the next iter())."""
        self.seed = seed

    @property
    def num_corrupt(self) -> int:
        return int(self._corrupt.value)

    def _samples(self, urls: Iterator[dict], keep: int | None, n_streams: int, lost: _Lost):
        """Samples of each shard read in turn; errors are counted in `lost` and reading goes on."""
        for u in urls:
            url = u["url"]
            events: list[Exception] = []

            def handler(exn: Exception, events: list = events) -> bool:
                events.append(exn)  # webdataset may call it twice for one cut (member, header)
                return True

            stream = wds.tarfile_samples([{"url": url}], handler=handler)
            read = 0
            for i, s in enumerate(stream):
                read = i + 1
                if keep is None or i % n_streams == keep:
                    yield s
            planned = self.lengths.get(url, 0)
            # tarfile ends quietly at a cut on a 512-byte boundary or inside a header: a shard
            # that yields fewer samples than info.json plans lost the rest, error or not
            if events or read < planned:
                gone = range(read, max(planned, read))
                n = len(gone) if keep is None else sum(i % n_streams == keep for i in gone)
                lost.add(n, url)
                why = events[0] if events else "the tar ends early"
                log.warning(
                    "unreadable shard data in %s after %d of %d samples (%s); %d samples lost",
                    url, read, planned, why, n,
                )  # fmt: skip
            else:
                lost.ok(url)

    def __iter__(self) -> Iterator[dict]:
        if self.rows is None:
            raise RuntimeError(
                f"ImageNetShards {self.info_url}: set_rows(rows) was not called, so its labels "
                "would be the shards' class ids, not vocabulary rows; call set_rows(rows) "
                f"(torch.arange({len(self.synsets)}) for the class ids themselves) before iterating"
            )
        stream, n_streams = _stream_of_process(self.rank, self.world_size)
        if len(self.urls) >= n_streams:
            mine, keep = self.urls[stream::n_streams], None
        else:
            mine, keep = self.urls, stream
        shards = wds.ResampledShards(
            mine, seed=self.seed, worker_seed=lambda: stream, deterministic=True
        )
        rng = np.random.default_rng([self.seed, stream])
        shuffle = wds.shuffle(
            self.shuffle_buffer,
            min(100, self.shuffle_buffer),
            rng=random.Random(int(rng.integers(2**62))),
        )
        lost = _Lost(set(mine))
        n_classes = len(self.synsets)
        for s in shuffle(self._samples(iter(shards), keep, n_streams, lost)):
            try:
                c = int(s[CLS])
            except (KeyError, ValueError):
                c = None  # a sample cut short or garbled: undecodable, counted below
            if c is not None and not 0 <= c < n_classes:
                raise ValueError(
                    f"{s.get('__url__')}: sample {s.get('__key__')} has cls {c}, outside the "
                    f"{n_classes} synsets of {self.info_url} (shards and info.json do not match)"
                )
            try:
                if c is None:
                    raise KeyError(f"no readable {CLS} member")
                row = int(self.rows[c])
                if row < 0:
                    continue
                with Image.open(io.BytesIO(s[JPG])) as im:
                    img = im.convert("RGB")
            except (OSError, SyntaxError, ValueError, KeyError) as e:
                with self._corrupt.get_lock():
                    self._corrupt.value += 1
                    n = self._corrupt.value
                log.warning(
                    "skipping undecodable sample %s in %s (%s); %d so far",
                    s.get("__key__"),
                    s.get("__url__"),
                    e,
                    n,
                )
                lost.add(1, str(s.get("__url__")), shard_failed=False)
                continue
            if self.transform is None:
                x = normalize(np.asarray(img))
            else:
                x, _ = self.transform(img, None, rng)
            n_lost, lost_shards = lost.take()
            yield {
                "image": x,
                "labels": torch.tensor([row], dtype=torch.long),
                "key": s["__key__"],
                "lost": n_lost,
                "lost_shards": lost_shards,
            }


class _Lost:
    """Lost-data events of one stream since its last yielded sample (module docstring).

    A RuntimeError when every shard of the stream failed since the last sample: the resampled
    stream would otherwise loop over broken shards for ever."""

    def __init__(self, shards: set[str]) -> None:
        self.shards = shards
        self.n, self.names = 0, []
        self.failed: set[str] = set()

    def add(self, n: int, url: str, shard_failed: bool = True) -> None:
        """n samples lost at url; shard_failed: the shard could not be read to its end."""
        self.n += n
        self.names.append(url.rsplit("/", 1)[-1].split()[0])  # "pipe:cat x/a.tar -" -> "a.tar"
        if not shard_failed:
            return
        self.failed.add(url)
        if self.failed >= self.shards:
            raise RuntimeError(
                f"every shard of this stream failed to read since its last sample "
                f"({len(self.shards)}: {sorted(self.failed)[:5]}); see the warnings above"
            )

    def ok(self, url: str) -> None:
        self.failed.discard(url)

    def take(self) -> tuple[int, list[str]]:
        out = self.n, self.names
        self.n, self.names = 0, []
        self.failed.clear()
        return out
