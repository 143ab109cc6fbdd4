"""Installing the joint pass into Inductor's ``joint_custom_pre_pass`` hook.

torch 2.11 takes one callable per hook (2.13 also takes lists), so the plugin's pass and any
passes the user had there are composed into one ``CustomGraphPass``: the user's passes run after
ours and stay in the cache key. Ours is replaced, not stacked, when the hook already holds it
(nested ``enabled()`` blocks: the innermost config wins).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from mxfp8_compile.config import Config
from mxfp8_compile.passes import MXJointPass


class _WithUserPasses(CustomGraphPass):
    """Our pass, then the user's passes (one callable, or torch 2.13's list of them)."""

    def __init__(self, ours: MXJointPass, user: tuple[Any, ...]) -> None:
        self.ours, self.user = ours, user

    def __call__(self, graph: fx.Graph) -> None:
        self.ours(graph)
        for user_pass in self.user:
            user_pass(graph)

    def uuid(self) -> Any:
        uuids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.user]
        # A user pass without a uuid makes the graph uncacheable, as it would without us.
        return None if None in uuids else (self.ours.uuid(), *uuids)


def compose(existing: Any, ours: MXJointPass) -> CustomGraphPass:
    """``ours`` in place of our earlier pass, in front of whatever user passes ``existing`` holds."""
    if isinstance(existing, _WithUserPasses):
        existing = existing.user
    passes = tuple(existing) if isinstance(existing, (list, tuple)) else (existing,)
    user = tuple(p for p in passes if p is not None and not isinstance(p, (MXJointPass, _WithUserPasses)))
    return _WithUserPasses(ours, user) if user else ours


def joint_pass_patches(config: Config) -> dict[str, Any]:
    """Inductor config patches that run the plugin's joint pass with ``config``.

    Also registers the ``mxfp8::`` ops (an artifact served from Inductor's caches calls them
    without any pass having run in this process) and their Inductor lowerings.
    """
    import mxfp8_compile.lowering.inductor_quantize  # noqa: F401
    import mxfp8_compile.ops  # noqa: F401
    from torch._inductor import config as inductor_config

    return {"joint_custom_pre_pass": compose(inductor_config.joint_custom_pre_pass, MXJointPass(config))}
