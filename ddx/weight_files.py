"""PyTorch weight files that ddx reads (ddx.convert, the Inception conversion)
without torch being a dependency of ddx: why one does not read, in one line."""
from __future__ import annotations


def unreadable_reason(path: str, error: BaseException, what: str) -> str:
  """The one-line message for a weight file that torch/safetensors cannot read.

  Says what the file is not, never torch's advice to load it unsafely: a
  pickle that holds anything but tensors (and the few plain containers
  allowed) is refused, since unpickling it could run arbitrary code.
  """
  text = str(error)
  if "weights_only" in text or "Unsupported global" in text:
    why = "it holds Python objects besides tensors; ddx never unpickles those"
  else:
    first = text.strip().splitlines()[0] if text.strip() else ""
    why = f"{type(error).__name__}: {first[:100]}" if first else type(error).__name__
  return (f"{path} is not a readable {what} ({why}); re-download it, "
          "or re-save it as a plain state_dict of tensors")
