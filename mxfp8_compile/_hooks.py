"""Installing the joint pass into Inductor's ``joint_custom_pre_pass`` hook.

torch 2.11 takes one callable per hook (2.13 also takes lists), so the plugin's pass and any
pass the user had there are composed into one ``CustomGraphPass``: the user's pass runs after
ours and stays in the cache key. Ours is replaced, not stacked, when the hook already holds it
(nested ``enabled()`` blocks: the innermost config wins).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from mxfp8_compile.config import Config
from mxfp8_compile.passes import MXJointPass


class _WithUserPass(CustomGraphPass):
    def __init__(self, ours: MXJointPass, user: Any) -> None:
        self.ours, self.user = ours, user

    def __call__(self, graph: fx.Graph) -> None:
        self.ours(graph)
        self.user(graph)

    def uuid(self) -> Any:
        user_uuid = self.user.uuid() if isinstance(self.user, CustomGraphPass) else None
        # A user pass without a uuid makes the graph uncacheable, as it would without us.
        return None if user_uuid is None else (self.ours.uuid(), user_uuid)


def compose(existing: Any, ours: MXJointPass) -> CustomGraphPass:
    """``ours`` in place of our earlier pass, in front of whatever user pass ``existing`` holds."""
    if isinstance(existing, _WithUserPass):
        existing = existing.user
    if existing is None or isinstance(existing, MXJointPass):
        return ours
    return _WithUserPass(ours, existing)


def joint_pass_patches(config: Config) -> dict[str, Any]:
    """Inductor config patches that run the plugin's joint pass with ``config``.

    Also registers the ``mxfp8::`` ops: an artifact served from Inductor's caches calls them
    without any pass having run in this process.
    """
    import mxfp8_compile.ops  # noqa: F401
    from torch._inductor import config as inductor_config

    return {"joint_custom_pre_pass": compose(inductor_config.joint_custom_pre_pass, MXJointPass(config))}
