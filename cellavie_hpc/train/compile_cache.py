"""XLA's persistent compilation cache (`train.compile_cache_dir`): compile a model's step once, not per run.

With `xla: true` most of a rank's first step is XLA compiling the forward/backward cluster, paid again
by every rank of every run (`benchmarks/startup.py`, U-Net on 2 CPU cores: first step 11 s with XLA,
4-6 s without; 5-8 s with XLA and a warm cache). TensorFlow can keep compiled clusters on disk
(`--tf_xla_persistent_cache_directory` in `TF_XLA_FLAGS`, one
`xla_compile_cache__<signature>__<hlo>__<device>.pb` per cluster) and loads one in a later process
when the cluster's HLO and signature match. Two things need care:

* TensorFlow reads `TF_XLA_FLAGS` once, when its runtime starts (the first op, not the import):
  `export` must run before any op of the process (`train()` calls it first).
* TensorFlow writes an entry in place, and a process that reads a half-written entry fails (a corrupt
  entry is an error, not a miss). So no process lets TensorFlow write into the shared folder: each
  points it at a private folder, filled with hard links to the shared entries, and `publish` moves
  the entries it compiled into the shared folder by an atomic rename.

Entries are native code for one CPU or GPU type; the shared folder is split per TensorFlow version and
CPU model so that nodes of another type, or another TensorFlow, never load them.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

from cellavie_hpc.errors import ConfigError

FLAG = "--tf_xla_persistent_cache_directory"
ENTRY_GLOB = "xla_compile_cache__*.pb"


def entries(folder: str | Path) -> list[Path]:
    """The cache entries (compiled clusters) in `folder`, sorted by name."""
    return sorted(Path(folder).glob(ENTRY_GLOB))


def cache_folder(root: str | Path) -> Path:
    """`root` (`~` and `$VARS` expanded) / `tf<version>-<CPU model hash>`: the part this host may share."""
    import tensorflow as tf

    from cellavie_hpc.train.environment import cpu_name

    text = os.path.expanduser(os.path.expandvars(str(root)))
    if "$" in text:
        raise ConfigError(f"train.compile_cache_dir {str(root)!r}: environment variable not set (expanded to "
                          f"{text!r}); set it or give a plain path")
    if '"' in text:
        raise ConfigError(f"train.compile_cache_dir {text!r}: TF_XLA_FLAGS cannot hold a path with a double quote; "
                          "choose another folder")
    machine = hashlib.sha256(cpu_name().encode()).hexdigest()[:10]
    return Path(text) / f"tf{tf.__version__}-{machine}"


class CompileCache:
    """One process's view of a shared compilation cache folder: `export` first, `publish` after compiling,
    `close` at the end."""

    def __init__(self, root: str | Path):
        self.folder = cache_folder(root)
        self.private = self.folder / f".tmp-{socket.gethostname()}-{os.getpid()}"
        self.found = 0

    def export(self) -> None:
        """Point TensorFlow (`TF_XLA_FLAGS`) at a private folder holding the shared entries; counts them in `found`."""
        try:
            self.private.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"train.compile_cache_dir: cannot create {self.private} ({err}); "
                              "choose a writable folder") from err
        shared = entries(self.folder)
        for entry in shared:
            _link_or_copy(entry, self.private / entry.name)
        self.found = len(shared)
        # Quoted: TensorFlow splits TF_XLA_FLAGS at spaces outside double quotes.
        os.environ["TF_XLA_FLAGS"] = f'{os.environ.get("TF_XLA_FLAGS", "")} {FLAG}="{self.private}"'.strip()

    def publish(self) -> int:
        """Move the entries this process compiled into the shared folder (atomic rename); how many."""
        known = {e.name for e in entries(self.folder)}
        added = 0
        for entry in entries(self.private):
            if entry.name in known:
                continue
            partial = self.folder / f".{entry.name}.{os.getpid()}.partial"
            partial.unlink(missing_ok=True)
            _link_or_copy(entry, partial)
            os.replace(partial, self.folder / entry.name)
            added += 1
        return added

    def close(self) -> int:
        """Publish what is left and remove the private folder; entries published."""
        try:
            return self.publish()
        finally:
            shutil.rmtree(self.private, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except FileExistsError:
        pass  # linked by this process already
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)
