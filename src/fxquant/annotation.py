"""The typed per-node annotation that the annotate pass writes and every later pass reads.

Kept in ``node.meta["fxquant"]`` as one dataclass — never a dict of ad-hoc string keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.fx import Node

__all__ = ["QSpec", "NodeAnnotation", "get_annotation", "set_annotation", "META_KEY"]

META_KEY = "fxquant"


@dataclass(frozen=True)
class QSpec:
    """How one value (an input edge or a node's output) is quantized.

    ``ctor`` builds the observer / fake quant; ``dtype`` is the plain target dtype (float32 = stays float);
    ``is_dynamic`` means qparams are chosen at run time (no output observer, input observed only on arg 0).
    """

    ctor: Optional[Callable[[], torch.nn.Module]]
    dtype: torch.dtype = torch.float32
    is_dynamic: bool = False
    obs_cls: Optional[type] = None  # class of what ctor builds
    blends: bool = False  # two tensors observed by one instance give a blend of their ranges, not the union

    @property
    def quantized(self) -> bool:
        """True when this value is turned into a non-float32 dtype."""
        return self.ctor is not None and self.dtype != torch.float32


FLOAT = QSpec(None)


@dataclass
class NodeAnnotation:
    """What fxquant decided for one node.

    Attributes:
        qconfig: the resolved QConfig (None: the node stays float).
        pattern: the backend pattern the node was matched in (complex format), or None.
        is_root: first node of its matched pattern (its inputs are observed).
        is_last: last node of its matched pattern (its output is observed).
        input_act / weight / output: specs for activation inputs, the weight input, the output.
        weight_index / bias_index: argument positions of weight and bias for functional ops.
        share_io: the output keeps the input's qparams (pooling, reshape, ...): one observer for both.
        reuse_input: the qconfig says "reuse the input's observer" (default_reuse_input_qconfig).
        reason: why the node stays float (empty when it is quantized) — shown by ``fxquant.explain``.
    """

    qconfig: Any = None
    pattern: Any = None
    config: Any = None  # the BackendPatternConfig of the match
    matched: tuple[Node, ...] = ()
    is_root: bool = True
    is_last: bool = True
    input_act: QSpec = FLOAT
    weight: QSpec = FLOAT
    output: QSpec = FLOAT
    weight_index: Optional[int] = None
    bias_index: Optional[int] = None
    share_io: bool = False
    reuse_input: bool = False
    standalone: bool = False
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def get_annotation(node: Node) -> NodeAnnotation:
    """The node's annotation; a float default when the annotate pass did not touch it."""
    ann = node.meta.get(META_KEY)
    return ann if ann is not None else NodeAnnotation()


def set_annotation(node: Node, ann: NodeAnnotation) -> None:
    node.meta[META_KEY] = ann
