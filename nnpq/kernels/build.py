"""Building the project's C++ CPU kernels on first use (``torch.utils.cpp_extension.load_inline``).

Each library is compiled once (about 30 s of g++) into torch's extension directory
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); later processes load the
cached build. Its ops register under ``torch.ops.<name>``. A failed build (no compiler) is
remembered, so callers fall back to their plain-torch paths and can say why.
"""

from __future__ import annotations

from pathlib import Path

_STATE: dict[str, str | None] = {}  # name -> None (loaded) or the build error


def load_extension(name: str, source: Path, build: bool = True) -> bool:
    """Load (compiling if ``build``) the ops of the C++ file ``source`` as ``torch.ops.<name>``; True on success."""
    if name in _STATE:
        return _STATE[name] is None
    if not build:
        return False
    from torch.utils.cpp_extension import load_inline

    try:
        load_inline(name, cpp_sources=[source.read_text()], is_python_module=False,
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"], extra_ldflags=["-fopenmp"])
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        text = str(exc).splitlines()[0] if str(exc) else ""
        _STATE[name] = f"{type(exc).__name__}: {text}"
        return False
    _STATE[name] = None
    return True


def build_error(name: str) -> str | None:
    """Why the library ``name`` could not be built, if it could not."""
    return _STATE.get(name)
