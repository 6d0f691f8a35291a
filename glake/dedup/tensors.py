"""share(): torch tensors (a module's weights) packed into dedup arenas and shared across processes."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

from glake.dedup.arena import Arena
from glake.errors import InvalidArgumentError

ALIGN = 512  # bytes between packed tensors: every dtype's alignment, and torch's allocator's


class SharedTensors:
    """What :func:`share` packed: its arenas (one per device) and the tensors now living in them."""

    def __init__(self, arenas: List[Arena], tensors: Dict[str, Any]) -> None:
        self.arenas, self.tensors = arenas, tensors

    def stats(self) -> Dict[str, int]:
        """The arenas' figures summed (``shared_bytes``, ``saved_bytes``, ``private_bytes``, ...)."""
        out: Dict[str, int] = {}
        for a in self.arenas:
            for k, v in a.stats().items():
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        """Frees the arenas. The tensors that live in them must not be used afterwards."""
        for a in self.arenas:
            a.close()


def _targets(obj: Any) -> List[Tuple[str, Any, Callable[[Any], None]]]:
    """(name, tensor, rebind) for every tensor of `obj`, in a deterministic order (processes that load
    the same model pack the same bytes into the same chunks)."""
    import torch

    if isinstance(obj, torch.nn.Module):
        out = []
        for name, p in obj.named_parameters():
            out.append((name, p, lambda v, p=p: setattr(p, "data", v)))
        for name, b in obj.named_buffers():
            mod_name, _, attr = name.rpartition(".")
            mod = obj.get_submodule(mod_name) if mod_name else obj
            out.append((name, b, lambda v, m=mod, a=attr: m._buffers.__setitem__(a, v)))
        return out
    if isinstance(obj, dict):
        return [(str(k), t, lambda v, k=k: obj.__setitem__(k, v)) for k, t in obj.items()]
    if isinstance(obj, list):
        return [(str(i), t, lambda v, i=i: obj.__setitem__(i, v)) for i, t in enumerate(obj)]
    if isinstance(obj, torch.Tensor):
        return [("0", obj, lambda v: None)]
    raise InvalidArgumentError(f"glake.dedup.share: expected a torch Module, a dict or list of tensors or a tensor, "
                               f"got {type(obj).__name__}")


def share(obj: Any) -> SharedTensors:
    """Moves the tensors of ``obj`` into dedup arenas and shares their whole chunks with this user's other
    processes that hold the same bytes.

    ``obj`` is a ``torch.nn.Module`` (its parameters and buffers are rebound in place, as
    ``param.data = ...``), a dict or list of tensors (its items are replaced), or one tensor (see the
    result's ``tensors``). Each device's tensors are packed back to back (512-byte aligned, in
    the module's order) into one arena on that device (cuda tensors: the cuda backend; CPU tensors: the
    host backend), so processes loading the same model pack identical chunks. The original tensors' memory
    is left to their allocator. Shared chunks are read-only: writing the weights afterwards faults.

    Raises
    ------
    InvalidArgumentError
        A tensor requires grad (shared weights cannot be trained: call ``requires_grad_(False)`` first),
        or ``obj`` holds no tensor.
    """
    import torch

    targets = _targets(obj)
    if not targets:
        raise InvalidArgumentError("glake.dedup.share: no tensor to share")
    for name, t, _ in targets:
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(f"glake.dedup.share: {name!r} is a {type(t).__name__}, not a tensor")
        if t.requires_grad:
            raise InvalidArgumentError(f"glake.dedup.share: {name!r} requires grad; shared chunks are read-only, "
                                       "so only frozen weights can be shared (call requires_grad_(False) first)")
    by_device: Dict[torch.device, List[Tuple[str, Any, Callable[[Any], None]]]] = {}
    for item in targets:
        by_device.setdefault(item[1].device, []).append(item)
    arenas, tensors = [], {}
    for dev, items in by_device.items():
        if dev.type not in ("cuda", "cpu"):
            raise InvalidArgumentError(f"glake.dedup.share: tensors on {dev} cannot be shared (cuda or cpu only)")
        offsets, at = [], 0
        for _, t, _ in items:
            offsets.append(at)
            at += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        arena = Arena(max(at, 1), device=dev.index or 0, backend="cuda" if dev.type == "cuda" else "host")
        base = arena.tensor()
        for (name, t, rebind), off in zip(items, offsets):
            view = base[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            view.copy_(t)
            rebind(view)
            tensors[name] = view
        arena.share()
        arenas.append(arena)
    return SharedTensors(arenas, tensors)
