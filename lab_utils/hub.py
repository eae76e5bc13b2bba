"""Hub upload: README.md and the chosen export parts to a (private by default) model repo, or a dry run listing them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .choices import EXPORT_PARTS
from .environment import get_secret, hub_offline, hub_reachable
from .errors import problem

# ----------------------------------------------------------------------------------------------
# push


def _get_token(token: str | None) -> str | None:
    """Return the HF token: the argument, else $HF_TOKEN, else Colab's secret 'HF_TOKEN' (never printed)."""
    if token:
        return token
    return get_secret("HF_TOKEN") or None


def _upload_list(export_dir: Path, what: Sequence[str]) -> list[tuple[str, int]]:
    """Return [(path in repo, size)] for README.md and the files of the chosen export parts."""
    files: list[tuple[str, int]] = []
    if (export_dir / "README.md").is_file():
        files.append(("README.md", (export_dir / "README.md").stat().st_size))
    for part in what:
        root = export_dir / part
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(export_dir)
            if f.is_file() and not any(p.startswith(".") for p in rel.parts):
                files.append((rel.as_posix(), f.stat().st_size))
    return files


def push_to_hub(
    export_dir: Path,
    repo_id: str,
    *,
    what: Sequence[str] = ("adapter", "merged", "gguf"),
    private: bool = True,
    dry_run: bool | None = None,
    token: str | None = None,
) -> list[str]:
    """Upload README.md + the chosen parts of export_dir to repo_id (or, in a dry run, list them); return the paths in the repo."""
    from .export import _human  # export imports this module: its helper comes late

    export_dir = Path(export_dir)
    bad = [w for w in what if w not in EXPORT_PARTS]
    if bad:
        raise problem("unknown export part", got=f"{bad}", fix=f"choose from {EXPORT_PARTS}")
    if "/" not in repo_id:
        raise problem("repo id needs an owner", got=f"{repo_id!r}", fix=f"use 'your-username/{repo_id}'")
    files = _upload_list(export_dir, what)
    if not files:
        raise problem("nothing to upload", got=f"no files for {list(what)} in {export_dir}", fix="run the export first")
    tok = _get_token(token)
    reason = ""
    if dry_run is None:
        if not tok:
            dry_run, reason = True, "no HF token (set HF_TOKEN in Colab secrets)"
        elif hub_offline():
            dry_run, reason = True, "HF_HUB_OFFLINE is set"
        elif not hub_reachable():
            dry_run, reason = True, "the Hub is unreachable"
        else:
            dry_run = False
    total = sum(size for _, size in files)
    if dry_run:
        print(f"dry run{f' ({reason})' if reason else ''}: would upload {len(files)} files ({_human(total)}) "
              f"to https://huggingface.co/{repo_id} ({'private' if private else 'public'}):")
        for path, size in files:
            print(f"  {repo_id}: {path}  ({_human(size)})")
        return [p for p, _ in files]
    if not tok:
        raise problem("no Hugging Face token", got="none in the argument, $HF_TOKEN or Colab secrets",
                      fix="add HF_TOKEN (write access) in Colab's key icon, or push with dry_run=True")
    from huggingface_hub import HfApi

    api = HfApi(token=tok)
    print(f"pushing {len(files)} files ({_human(total)}) to https://huggingface.co/{repo_id} ...")
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(export_dir),
        repo_type="model",
        allow_patterns=[p for p, _ in files],
        commit_message=f"Upload {', '.join(what)} from qlora-lab",
    )
    print(f"done: https://huggingface.co/{repo_id}")
    return [p for p, _ in files]
