r"""Flows: an ``nn.Module`` that yields a Pyro distribution, and one-line builders.

A flow is the push-forward of a standard normal base through transforms
:math:`T = T_K \circ \dots \circ T_1` (base ``u`` to data ``x``):

.. math::
    x = T(u),\quad u \sim \mathcal N(0, I_D), \qquad
    \log p(x) = \log \mathcal N\big(T^{-1}(x); 0, I\big)
                - \sum_k \log\left|\det J_{T_k}(u_{k-1})\right|

Calling a :class:`Flow` (with a context if it is conditional) returns a
``pyro.distributions.TransformedDistribution`` with ``event_shape == (D,)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.distributions import Distribution, Transform
from torch.distributions.utils import _sum_rightmost

from pyroflows._checks import (
    check_bool,
    check_choice,
    check_context_broadcast,
    check_event,
    check_finite,
    check_finite_context,
    check_positive_int,
)
from pyroflows._pickling import DropsParamStoreLinks
from pyroflows._pyro_module import RefusesPyroModule
from pyroflows._torch_modes import functorch_active
from pyroflows.transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineAutoregressive,
    AffineCoupling,
    ConditionalAdditiveCoupling,
    ConditionalAffineAutoregressive,
    ConditionalAffineCoupling,
    ConditionalFlowTransform,
    ConditionalSplineAutoregressive,
    ConditionalSplineCoupling,
    FlowTransform,
    Permutation,
    SplineAutoregressive,
    SplineCoupling,
)
from pyroflows.transforms.base import _CachedBijection, _forget_tensor_lists

PERMUTATIONS = ("reverse", "random", None)


def _size_of(t: nn.Module) -> int | None:
    """The event size a layer acts on, where it says: ``dim`` here, ``input_dim`` in Pyro.

    Pyro's autoregressive layers (``affine_autoregressive``, ``spline_autoregressive``,
    ``neural_autoregressive``, ...) say it by their network's ``arn.input_dim``, the
    conditional ones by ``nn.input_dim`` (a ``ConditionalAutoRegressiveNN``). (Pyro's
    ``AffineCoupling`` and ``Permute`` have a ``dim`` too: the tensor dim they act along,
    ``-1``; its coupling layers do not say their size.)
    """
    if isinstance(t, (FlowTransform, ConditionalFlowTransform)):
        return t.dim
    size = getattr(t, "input_dim", None)
    if size is None:
        size = getattr(getattr(t, "arn", None), "input_dim", None)
    if size is None and isinstance(getattr(t, "nn", None), ConditionalAutoRegressiveNN):
        size = t.nn.input_dim  # Pyro's conditional autoregressive layers keep it there
    return size if isinstance(size, int) and not isinstance(size, bool) else None


_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))  # torch's Normal.log_prob constant, as it is


def _sample_shape(shape: Any) -> Any:
    """``shape`` as torch takes it; an int (``d.sample(5)``) is named, not left to fail."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        raise TypeError(
            f"sample_shape must be a tuple of ints, such as ({int(shape)},) for "
            f"{int(shape)} draws, got the int {int(shape)}"
        )
    return shape


class _DiagonalNormal(dist.Normal):
    r"""The flow's base: Pyro's ``Normal``, scored in fewer autograd nodes.

    .. math::
        \log p(u) = (u - \mu)^2 \cdot \Big(-\frac{1}{2\sigma^2}\Big)
                    - \big(\log\sigma + \log\sqrt{2\pi}\big)

    The same numbers as ``Normal.log_prob`` (bit for bit at the flow's own base,
    :math:`\mu = 0, \sigma = 1`, where both constant factors are exact), in four
    autograd nodes where torch's form takes six: 2-3% of an MAF or RealNVP training step
    at D = 8.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Elementwise log-density of ``value``."""
        if self._validate_args:
            self._validate_sample(value)
        scale = self.scale
        return (value - self.loc).square() * (-0.5 / scale.square()) - (scale.log() + _LOG_SQRT_2PI)


class FlowDistribution(dist.TransformedDistribution):
    """The distribution a :class:`Flow` yields: Pyro's ``TransformedDistribution``, checked.

    It behaves exactly as ``pyro.distributions.TransformedDistribution`` (it is one), and
    checks the value given to :meth:`log_prob` first, so a wrong last dimension is named
    in the error rather than surfacing from deep inside a transform. With distribution
    validation on (torch's default; ``pyro.enable_validation(False)`` turns it off) a NaN
    or an infinity in it is a ``ValueError`` saying where, not a NaN log-density.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(x)` of ``value`` (shape ``(*sample, *batch, D)``)."""
        try:
            return self._log_prob(value)
        except (TypeError, RuntimeError) as error:
            self._check_current(error)
            raise

    def _check_current(self, error: Exception) -> None:
        """After an error: name a distribution made before its flow changed dtype.

        ``flow()`` builds the base with the flow's dtype at that moment; a ``.double()``
        or ``.float()`` of the flow afterwards converts the layers but not this base, and
        the layers' own checks would then blame the value (or suggest converting the flow
        back). Judged by the flow's own base buffer, now against when the distribution was
        made, so a flow converted in part (its layers only) keeps the layers' message.
        """
        flow = self.__dict__.get("_made_by")
        if flow is None:  # not made by a Flow (or an expanded copy)
            return
        then, now = self.base_dist.mean.dtype, flow.base_loc.dtype
        if then != now:
            raise TypeError(
                f"this distribution was made while its flow was {then}, and the flow is now "
                f"{now} (a .double(), .float() or .to() after flow()): call flow() (or "
                f"flow(context)) again for a distribution of the flow as it is"
            ) from error

    def _log_prob(self, value: torch.Tensor) -> torch.Tensor:
        check_event(value, "value", self.event_shape[0], self.base_dist.mean)
        shape = check_context_broadcast(value.shape[:-1], "value", self.batch_shape)
        if 0 in shape or value.numel() == 0:  # no rows: torch's reshapes cannot infer a size
            return value.new_zeros(shape)
        # torch's loop, in the same operations, with one call per pyroflows layer for its
        # inverse and log-det (torch's two calls look the pair up in the cache twice, and
        # keep a pair that is not needed again)
        if self._validate_args:
            self._validate_sample(value)
        event_dim = len(self.event_shape)
        log_prob: torch.Tensor | float = 0.0
        y = value
        for transform in reversed(self.transforms):
            if isinstance(transform, _CachedBijection):
                x, ladj = transform.inv_and_log_abs_det(y)
            else:
                x = transform.inv(y)
                ladj = transform.log_abs_det_jacobian(x, y)
            event_dim += transform.domain.event_dim - transform.codomain.event_dim
            log_prob = log_prob - _sum_rightmost(ladj, event_dim - transform.domain.event_dim)
            y = x
        return log_prob + _sum_rightmost(
            self.base_dist.log_prob(y), event_dim - len(self.base_dist.event_shape)
        )

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Draws of shape ``(*sample_shape, *batch_shape, D)``, without gradient."""
        try:
            return super().sample(_sample_shape(sample_shape))
        except (TypeError, RuntimeError) as error:
            self._check_current(error)
            raise

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Reparametrized draws of shape ``(*sample_shape, *batch_shape, D)``."""
        try:
            return super().rsample(_sample_shape(sample_shape))
        except (TypeError, RuntimeError) as error:
            self._check_current(error)
            raise

    def _validate_sample(self, value: torch.Tensor) -> None:
        # torch's check, run by log_prob when validation is on (unless turned off): its
        # shape checks are log_prob's own above; its support (R^D) check is this one,
        # which also refuses infinities (torch's lets them through, to come out as NaN)
        check_finite(value, "value", "a flow scores finite points only")


class Flow(RefusesPyroModule, DropsParamStoreLinks, nn.Module):
    r"""A normalizing flow: a standard normal base and a list of transforms, as a module.

    ``flow()`` (unconditional) or ``flow(context)`` (conditional) returns a
    ``pyro.distributions.TransformedDistribution``. With a context of shape ``(*B, c)``
    its ``batch_shape`` is ``B``, so ``.sample()`` gives ``(*B, D)`` without arguments and
    ``.sample((n,))`` gives ``(n, *B, D)``.

    Cost: sampling runs every transform forward (``t(u)``), scoring runs every inverse
    (``t.inv(x)``); see each transform for the passes that takes. A distribution caches
    the last sample per layer, so ``d.log_prob(d.rsample())`` costs no inverse. In this
    library's layers a kept sample is scored afresh once the weights change: after any
    ``torch.optim`` step (fused ones and Pyro's ``ClippedAdam`` included), a load, or an
    in-place change. Writes into the weights outside an optimizer that torch does not
    count (``p.data.add_(...)``) are not seen: call :meth:`clear_cache` after them. (A
    Pyro transform in the list keeps torch's cache, which sees no change of weights,
    pyro#2542: draw anew, or call :meth:`clear_cache`, before scoring an earlier draw.)

    The distribution reads the layers' parameters when it is used, not when it is made.
    So with ``torch.func.functional_call``, score inside the call: ``functional_call(flow,
    params, ())`` returns a distribution that, used after the call, reads the module's own
    parameters, and gradients never reach ``params``. Call a function (or a small module)
    that both builds and scores, e.g. ``functional_call(scorer, params, (x,))`` where
    ``scorer.forward(x)`` returns ``self.flow().log_prob(x)``.

    Args:
        dim: event size ``D``.
        transforms: the layers, applied first to last from base to data. Conditional
            layers (``ConditionalTransformModule``) are conditioned on the context. The
            base takes their weights' dtype and device (layers made float64 first give a
            float64 flow).
        context: context size ``c``, 0 for an unconditional flow.

    Raises:
        TypeError: a layer that is not a transform module (a Pyro ``TransformModule``,
            or a ``ConditionalTransformModule``, such as the layers of this library).
        ValueError: a layer whose size is not ``dim`` (a Pyro layer's ``input_dim``,
            where it has one), layers whose weights differ in dtype or device, a
            conditional layer of another context size (Pyro's too, by its network's
            ``context_dim``) or in a flow with ``context=0``, no
            conditional layer in a flow with a context, or a missing, unexpected or
            mis-shaped context at call time, or one holding NaN or inf (checked while
            distribution validation is on, torch's default).

    Example:
        >>> flow = realnvp(2, transforms=2, hidden=(16,))
        >>> d = flow()
        >>> d.sample((5,)).shape, d.batch_shape, d.event_shape
        (torch.Size([5, 2]), torch.Size([]), torch.Size([2]))
    """

    def __init__(self, dim: int, transforms: Iterable[nn.Module], context: int | None = 0) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.context_features = context = _context(context)
        if isinstance(transforms, Flow):
            raise TypeError(
                "transforms must be a list of transform modules, got a Flow; pass flow.transforms"
            )
        if isinstance(transforms, (Transform, ConditionalTransformModule)):
            raise TypeError(
                f"transforms must be a list of transform modules, got one transform "
                f"({type(transforms).__name__}); pass [layer]"
            )
        transforms = list(transforms)  # a generator would be used up by the checks below
        for i, t in enumerate(transforms):
            if not (
                isinstance(t, nn.Module) and isinstance(t, (Transform, ConditionalTransformModule))
            ):
                hint = ""
                if isinstance(t, Transform):  # Pyro's Permute, ExpTransform: no weights
                    hint = (
                        " (a Transform that is not an nn.Module; for a fixed permutation "
                        "use pyroflows.transforms.Permutation)"
                    )
                raise TypeError(
                    f"transforms[{i}] must be a transform module (a Pyro TransformModule or "
                    f"ConditionalTransformModule, such as the layers in pyroflows.transforms), "
                    f"got {type(t).__name__}{hint}"
                )
            t_dim = _size_of(t)
            if t_dim is not None and t_dim != dim:
                raise ValueError(f"transforms[{i}] acts on dim {t_dim}, expected dim {dim}")
            if isinstance(t, ConditionalTransformModule):
                t_context = getattr(t, "context_features", None)
                if t_context is None:  # Pyro's conditional layers: by their network
                    t_context = _pyro_context(t, context)
                if not context or t_context != context:
                    raise ValueError(
                        f"transforms[{i}] is conditional on a context of size {t_context}, "
                        f"but the flow was given context={context}"
                    )
        if context and not any(isinstance(t, ConditionalTransformModule) for t in transforms):
            raise ValueError(
                f"the flow was given context={context}, but none of its transforms is "
                f"conditional (a ConditionalTransformModule, such as "
                f"pyroflows.transforms.ConditionalAffineCoupling): the context would be "
                f"ignored; use conditional layers, or context=0"
            )
        like = _common_weights(transforms)
        self.transforms = nn.ModuleList(transforms)
        self.register_buffer(
            "base_loc", torch.zeros(self.dim, dtype=like.dtype, device=like.device)
        )
        self.register_buffer("base_scale", torch.ones_like(self.base_loc))
        self.register_load_state_dict_post_hook(_align_dtype_references)
        _align_dtype_references(self)  # layers without weights take the others' dtype

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_base_cache", None)  # rebuilt on first use
        return state

    def clear_cache(self) -> None:
        """Forget every layer's kept sample, the conditioned layers' of past calls too.

        For this library's layers it is needed only after writing into the weights past
        torch's version counters and outside an optimizer's step (``p.data.add_(...)``,
        ``p.data.copy_(...)``), and after changing a part of a layer's part (an activation
        inside its conditioner, a spline's bound), which its cache does not see (a
        conditioner assigned to the layer itself is seen); a Pyro transform in
        the flow keeps torch's cache of its last pair through any change of weights, and
        this empties it too.
        """
        _forget_tensor_lists(self)
        for t in self.modules():  # a ComposeTransformModule's parts too
            if "_cached_x_y" in t.__dict__:  # torch's own one-pair cache (Pyro's layers)
                t._cached_x_y = None, None

    @property
    def conditional(self) -> bool:
        """Whether the flow needs a context."""
        return self.context_features > 0

    def base(self, batch_shape: torch.Size | tuple[int, ...] = ()) -> dist.TorchDistribution:
        r"""The base distribution :math:`\mathcal N(0, I_D)` with the given batch shape."""
        cached = self.__dict__.get("_base_cache")
        if cached is None or cached[0] is not self.base_loc or cached[1] is not self.base_scale:
            # built once per set of buffers (.to() replaces them): a Normal is immutable
            normal = _DiagonalNormal(self.base_loc, self.base_scale, validate_args=False)
            normal = normal.to_event(1)
            cached = (self.base_loc, self.base_scale, normal)
            if not functorch_active():  # under jacrev/grad its tensors are wrappers
                self.__dict__["_base_cache"] = cached
        normal = cached[2]
        return normal.expand(torch.Size(batch_shape)) if batch_shape else normal

    def forward(self, context: torch.Tensor | None = None) -> FlowDistribution:
        """Return the distribution, conditioned on ``context`` (shape ``(*B, c)``) if given."""
        if not self.conditional:
            if context is not None:
                raise ValueError(
                    "context was given to an unconditional flow (built with context=0); "
                    "call flow() without arguments, or build the flow with context=c"
                )
            return self._made(FlowDistribution(self.base(), list(self.transforms)))
        if context is None:
            raise ValueError(
                f"this flow is conditional: call flow(context) with a context tensor of "
                f"shape (*batch, {self.context_features})"
            )
        check_event(context, "context", self.context_features, self.base_loc)
        if Distribution._validate_args:
            check_finite_context(context)
        transforms = [
            t.condition(context) if isinstance(t, ConditionalTransformModule) else t
            for t in self.transforms
        ]
        return self._made(FlowDistribution(self.base(context.shape[:-1]), transforms))

    def _made(self, d: FlowDistribution) -> FlowDistribution:
        # the distribution remembers its flow, so that a use after the flow changed dtype
        # is named as that (FlowDistribution._check_current), not blamed on the value
        d.__dict__["_made_by"] = self
        return d

    @torch.no_grad()
    def intermediates(
        self,
        num_samples: int = 1000,
        context: torch.Tensor | None = None,
        base: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        r"""The flow at work, layer by layer: ``[u, T_1(u), T_2(T_1(u)), ..., x]``.

        Draws ``num_samples`` base points (or takes ``base``, shape ``(*batch, D)``) and
        returns them after each transform, ``len(transforms) + 1`` tensors in all, the
        last being samples of the flow. Useful to plot how the base is bent into the data.

        Args:
            num_samples: how many base draws, when ``base`` is not given.
            context: the context, shape ``(*B, c)``, for a conditional flow.
            base: base-side points to push through instead of fresh draws.

        Example:
            >>> flow = realnvp(2, transforms=2, hidden=(8,))
            >>> [tuple(t.shape) for t in flow.intermediates(100)][:2]
            [(100, 2), (100, 2)]
        """
        d = self(context)
        if base is None:
            check_positive_int(num_samples, "num_samples")
            u = d.base_dist.sample((num_samples,))
        else:
            u = check_event(base, "base", self.dim, self.base_loc)
            shape = check_context_broadcast(u.shape[:-1], "base", d.batch_shape)
            u = u.expand(*shape, self.dim)  # every stage of one shape, the context's too
        stages = [u]
        for t in d.transforms:
            stages.append(t(stages[-1]))
        return stages

    def extra_repr(self) -> str:
        """Sizes, shown by ``repr``."""
        return f"dim={self.dim}, context={self.context_features}"


def _pyro_context(layer: nn.Module, default: int) -> int:
    """The context size of a Pyro conditional layer, read from its network ``nn``.

    A ``DenseNN`` (``conditional_spline``, ``conditional_planar``, ...) takes the
    context alone: its input size. A ``ConditionalDenseNN`` or
    ``ConditionalAutoRegressiveNN`` (coupling, autoregressive) takes it beside x: its
    ``context_dim``. Another network: ``default`` (not checked).
    """
    from pyro.nn import ConditionalAutoRegressiveNN, ConditionalDenseNN, DenseNN

    network = getattr(layer, "nn", None)
    if isinstance(network, DenseNN):
        return int(network.input_dim)
    if isinstance(network, (ConditionalDenseNN, ConditionalAutoRegressiveNN)):
        return int(network.context_dim)
    return default


def _common_weights(transforms: list[nn.Module]) -> torch.Tensor:
    """An empty tensor of the layers' one floating dtype and device (the defaults if none).

    Layers of several dtypes or devices are refused by name: the flow would fail on its
    first call, with a message about the wrong layer.
    """
    first: dict[tuple[torch.dtype, torch.device], int] = {}
    for i, t in enumerate(transforms):
        for p in t.parameters():
            if p.is_floating_point():
                first.setdefault((p.dtype, p.device), i)
    if len(first) > 1:
        held = ", ".join(
            f"{dtype} on {device} in transforms[{i}]" for (dtype, device), i in first.items()
        )
        raise ValueError(
            f"the transforms hold weights of several dtypes or devices ({held}); convert "
            "them to one (layer.double(), layer.to(device)) before building the flow"
        )
    if not first:
        return torch.empty(0)
    ((dtype, device),) = first
    return torch.empty(0, dtype=dtype, device=device)


def _align_dtype_references(flow: Flow, incompatible_keys: object = None) -> None:
    """After a load, give layers without weights (``Permutation``) the flow's dtype.

    Their dtype reference is a non-persistent buffer, which a ``load_state_dict(...,
    assign=True)`` of float64 weights into a float32 flow would leave float32, so the
    layer would refuse the flow's own float64 values.
    """
    like = flow.base_loc
    for module in flow.modules():
        reference = module._buffers.get("_dtype_ref")
        if reference is not None and (
            reference.dtype != like.dtype or reference.device != like.device
        ):
            module._buffers["_dtype_ref"] = reference.to(dtype=like.dtype, device=like.device)


def _context(context: int | None) -> int:
    return 0 if context is None else check_positive_int(context, "context", minimum=0)


#: the width of a conditioner's two hidden layers when none are given
DEFAULT_WIDTH = 64


def default_hidden(dim: int, context: int = 0, masked: bool = True) -> tuple[int, int]:
    """The hidden sizes the builders use when ``hidden`` is ``None``.

    ``(64, 64)``; for a MADE (``masked``: ``maf``, ``iaf``, autoregressive ``nsf``) at
    least ``D - 1`` wide (``D`` with a context), the width every input needs to reach the
    outputs of the variables after it (see :class:`~pyroflows.nn.MADE`).
    """
    width = max(DEFAULT_WIDTH, dim - 1 + (1 if context else 0)) if masked else DEFAULT_WIDTH
    return (width, width)


def _hidden_or_default(hidden, dim, context, masked: bool):
    if hidden is not None:
        return hidden
    dim, c = check_positive_int(dim, "dim"), _context(context)
    return default_hidden(dim, c, masked)


def _orders(dim: int, count: int, permutation: str | None) -> list[list[int] | None]:
    if permutation == "random":
        return [torch.randperm(dim).tolist() for _ in range(count)]
    if permutation == "reverse":
        return [list(range(dim))[:: -1 if k % 2 else 1] for k in range(count)]
    return [None] * count


def _coupling_permutation(dim: int) -> list[int]:
    """A random permutation that puts transformed coordinates on the conditioning side.

    A coupling layer transforms the last ``D - D // 2`` coordinates; this permutation
    sends ``D // 2`` of them to the front, where the next layer conditions on them. So
    the coordinates the layer passed through are transformed by the next one, and every
    coordinate is transformed at least every two layers. (A plain ``randperm`` can be the
    identity, or keep a coordinate on the pass-through side layer after layer.)
    """
    split = dim // 2
    transformed = (torch.randperm(dim - split) + split).tolist()
    rest = transformed[split:] + list(range(split))
    return transformed[:split] + [rest[i] for i in torch.randperm(len(rest)).tolist()]


def _coupling_flow(dim, transforms, context, permutation, make, make_conditional, tail=()):
    dim = check_positive_int(dim, "dim")
    if dim < 2:
        raise ValueError(
            f"dim must be >= 2 for a coupling flow (it splits the vector in two), got {dim}; "
            "for dim 1 use maf, iaf or nsf(1, autoregressive='maf' or 'iaf')"
        )
    transforms = check_positive_int(transforms, "transforms")
    check_choice(permutation, "permutation", PERMUTATIONS)
    if permutation is None and transforms > 1:
        raise ValueError(
            f"permutation=None would leave the first {dim // 2} coordinate(s) untransformed in "
            f"every layer of a coupling flow (each layer passes them through); use 'reverse' "
            f"or 'random'"
        )
    c = _context(context)
    layers: list[nn.Module] = []
    for k in range(transforms):
        if k:
            order = _coupling_permutation(dim) if permutation == "random" else permutation
            layers.append(Permutation(dim, order))
        layers.append(make_conditional(c) if c else make())
    layers.extend(tail)
    return Flow(dim, layers, c)


def realnvp(
    dim: int,
    transforms: int = 5,
    hidden: Sequence[int] | None = (64, 64),
    context: int | None = None,
    permutation: str | None = "reverse",
    activation: Callable[[], nn.Module] = nn.ReLU,
    clamp: float | None = 3.0,
) -> Flow:
    r"""RealNVP: affine coupling layers with permutations between them.

    .. math::
        x_b = u_b \odot e^{s(u_a, c)} + t(u_a, c), \qquad x_a = u_a

    One MLP pass per layer in both directions, so sampling and scoring are both fast.

    Args:
        dim: event size ``D`` (>= 2).
        transforms: number of coupling layers.
        hidden: hidden sizes of each coupling MLP (``None``: ``(64, 64)``).
        context: context size, or ``None`` for an unconditional flow.
        permutation: between layers: ``"reverse"`` or ``"random"`` (fixed at build time;
            it sends the coordinates a layer transformed to the next layer's conditioning
            side, so every coordinate is transformed at least every two layers). ``None``
            only for one layer.
        activation: non-linearity class.
        clamp: bound on each layer's log-scale.

    Example:
        >>> d = realnvp(2)()
        >>> d.log_prob(torch.zeros(2)).shape
        torch.Size([])

    References:
        Dinh, Sohl-Dickstein, Bengio (2016). Density estimation using Real NVP.
        arXiv:1605.08803.
    """
    hidden = _hidden_or_default(hidden, dim, context, masked=False)
    return _coupling_flow(
        dim,
        transforms,
        context,
        permutation,
        lambda: AffineCoupling(dim, hidden=hidden, activation=activation, clamp=clamp),
        lambda c: ConditionalAffineCoupling(
            dim, c, hidden=hidden, activation=activation, clamp=clamp
        ),
    )


def nice(
    dim: int,
    transforms: int = 4,
    hidden: Sequence[int] | None = (64, 64),
    context: int | None = None,
    permutation: str | None = "reverse",
    activation: Callable[[], nn.Module] = nn.ReLU,
    scale: bool = True,
) -> Flow:
    r"""NICE: additive coupling layers, then (by default) a learnable diagonal scaling.

    .. math::
        x_b = u_b + t(u_a, c), \qquad \text{then}\ x \leftarrow x \odot e^{s} + m

    The couplings preserve volume; the final :class:`~pyroflows.transforms.ActNorm`
    (identity at start, no data initialisation) is the only place the density's scale
    can change, as in the paper. One MLP pass per layer in both directions.

    Args:
        dim: event size ``D`` (>= 2).
        transforms: number of coupling layers.
        hidden: hidden sizes of each coupling MLP (``None``: ``(64, 64)``).
        context: context size, or ``None``.
        permutation: between layers: ``"reverse"`` or ``"random"`` (as for
            :func:`realnvp`); ``None`` only for one layer.
        activation: non-linearity class.
        scale: append the diagonal scaling layer.

    References:
        Dinh, Krueger, Bengio (2014). NICE: Non-linear Independent Components
        Estimation. arXiv:1410.8516.
    """
    hidden = _hidden_or_default(hidden, dim, context, masked=False)
    scale = check_bool(scale, "scale")
    return _coupling_flow(
        dim,
        transforms,
        context,
        permutation,
        lambda: AdditiveCoupling(dim, hidden=hidden, activation=activation),
        lambda c: ConditionalAdditiveCoupling(dim, c, hidden=hidden, activation=activation),
        tail=[ActNorm(dim, data_init=False)] if scale else (),
    )


def _autoregressive_flow(dim, transforms, context, permutation, make) -> Flow:
    """Stack ``transforms`` autoregressive layers ``make(order, c)``, varying the order."""
    dim = check_positive_int(dim, "dim")
    transforms = check_positive_int(transforms, "transforms")
    check_choice(permutation, "permutation", PERMUTATIONS)
    c = _context(context)
    layers = [make(order, c) for order in _orders(dim, transforms, permutation)]
    return Flow(dim, layers, c)


def _affine_autoregressive_flow(
    form, dim, transforms, hidden, context, permutation, activation, clamp
) -> Flow:
    hidden = _hidden_or_default(hidden, dim, context, masked=True)

    def make(order, c):
        if c:
            return ConditionalAffineAutoregressive(
                dim, c, form, hidden, order, activation=activation, clamp=clamp
            )
        return AffineAutoregressive(dim, form, hidden, order, activation=activation, clamp=clamp)

    return _autoregressive_flow(dim, transforms, context, permutation, make)


def maf(
    dim: int,
    transforms: int = 5,
    hidden: Sequence[int] | None = None,
    context: int | None = None,
    permutation: str | None = "reverse",
    activation: Callable[[], nn.Module] = nn.ReLU,
    clamp: float | None = 3.0,
) -> Flow:
    r"""Masked autoregressive flow: the conditioner reads the data side (fast scoring).

    .. math::
        x_i = u_i\, e^{s_i(x_{<i}, c)} + t_i(x_{<i}, c)

    Scoring data costs one MADE pass per layer; sampling costs ``D`` passes per layer.
    The choice for density estimation. Successive layers use alternating (``"reverse"``)
    or random variable orders, which costs nothing (no permutation layer is added).

    Args:
        dim: event size ``D``.
        transforms: number of layers.
        hidden: hidden sizes of each MADE (``None``: :func:`default_hidden`, ``(64, 64)``
            widened to ``D - 1``, or ``D`` with a context, for large ``D``).
        context: context size, or ``None``.
        permutation: variable order between layers: ``"reverse"``, ``"random"`` or ``None``.
        activation: non-linearity class.
        clamp: bound on each layer's log-scale.

    References:
        Papamakarios, Pavlakou, Murray (2017). Masked Autoregressive Flow for Density
        Estimation. arXiv:1705.07057.
    """
    return _affine_autoregressive_flow(
        "maf", dim, transforms, hidden, context, permutation, activation, clamp
    )


def iaf(
    dim: int,
    transforms: int = 5,
    hidden: Sequence[int] | None = None,
    context: int | None = None,
    permutation: str | None = "reverse",
    activation: Callable[[], nn.Module] = nn.ReLU,
    clamp: float | None = 3.0,
) -> Flow:
    r"""Inverse autoregressive flow: the conditioner reads the base side (fast sampling).

    .. math::
        x_i = u_i\, e^{s_i(u_{<i}, c)} + t_i(u_{<i}, c)

    Sampling costs one MADE pass per layer, and scoring the flow's own samples costs
    nothing more (cached); scoring *other* points costs ``D`` passes per layer. The
    choice for variational guides.

    Args:
        dim: event size ``D``.
        transforms: number of layers.
        hidden: hidden sizes of each MADE (``None``: :func:`default_hidden`, ``(64, 64)``
            widened to ``D - 1``, or ``D`` with a context, for large ``D``).
        context: context size, or ``None``.
        permutation: variable order between layers: ``"reverse"``, ``"random"`` or ``None``.
        activation: non-linearity class.
        clamp: bound on each layer's log-scale.

    References:
        Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling (2016). Improved
        Variational Inference with Inverse Autoregressive Flow. arXiv:1606.04934.
    """
    return _affine_autoregressive_flow(
        "iaf", dim, transforms, hidden, context, permutation, activation, clamp
    )


def nsf(
    dim: int,
    transforms: int = 5,
    bins: int = 8,
    bound: float = 5.0,
    hidden: Sequence[int] | None = None,
    context: int | None = None,
    autoregressive: bool | str = False,
    permutation: str | None = "reverse",
    activation: Callable[[], nn.Module] = nn.ReLU,
    side: str | None = None,
) -> Flow:
    r"""Neural spline flow: rational-quadratic spline layers, coupling or autoregressive.

    .. math::
        \text{coupling:}\quad x_{k+1:D} = \mathrm{RQS}^{\pm 1}\big(u_{k+1:D};\
        \mathrm{MLP}(u_{1:k}, c)\big) \qquad
        \text{autoregressive:}\quad x_i = \mathrm{RQS}^{\pm 1}\big(u_i;\ \mathrm{MADE}(v, c)_i\big)

    Each coordinate goes through a monotone spline (or its inverse, by ``side``) with
    ``bins`` bins on ``[-bound, bound]`` and the identity outside (see
    :func:`~pyroflows.transforms.rational_quadratic_spline`).

    ==================  =================  =======================================
    ``autoregressive``  sample ``t(u)``    score ``t.inv(x)``
    ==================  =================  =======================================
    ``False``           1 pass per layer   1 pass per layer (coupling, default)
    ``"maf"``/``True``  ``D`` passes       1 pass: density estimation
    ``"iaf"``           1 pass             ``D`` passes (own samples: cached)
    ==================  =================  =======================================

    Args:
        dim: event size ``D`` (>= 2 for coupling).
        transforms: number of spline layers.
        bins: spline bins per coordinate ``K``.
        bound: half-width of the spline's interval; keep data (standardized) inside it.
        hidden: hidden sizes of each conditioner (``None``: :func:`default_hidden`).
        context: context size, or ``None``.
        autoregressive: ``False`` (coupling), ``"maf"`` (or ``True``) or ``"iaf"``.
        permutation: between layers: ``"reverse"``, ``"random"`` or ``None`` (coupling:
            a permutation layer, as for :func:`realnvp`, so ``None`` only for one layer;
            autoregressive: the MADE's variable order).
        activation: non-linearity class.
        side: where each spline's argument lives: ``"base"`` (:math:`x = \mathrm{RQS}(u)`)
            or ``"data"`` (:math:`u = \mathrm{RQS}(x)`); ``None``: ``"base"`` for the IAF
            form, ``"data"`` otherwise, so the direction the flow is built for evaluates
            the rational function (see :class:`~pyroflows.transforms.RationalQuadratic`).

    Example:
        >>> d = nsf(3, transforms=2, hidden=(16,))()
        >>> d.log_prob(d.sample((4,))).shape
        torch.Size([4])

    References:
        Durkan, Bekasov, Murray, Papamakarios (2019). Neural Spline Flows.
        arXiv:1906.04032.
    """
    if autoregressive is True:
        autoregressive = "maf"
    check_choice(autoregressive, "autoregressive", (False, "maf", "iaf"))
    check_choice(side, "side", ("base", "data", None))
    hidden = _hidden_or_default(hidden, dim, context, masked=bool(autoregressive))
    if autoregressive:

        def make(order, c):
            if c:
                return ConditionalSplineAutoregressive(
                    dim, c, autoregressive, bins, bound, hidden, order, activation, side
                )
            return SplineAutoregressive(
                dim, autoregressive, bins, bound, hidden, order, activation, side
            )

        return _autoregressive_flow(dim, transforms, context, permutation, make)
    return _coupling_flow(
        dim,
        transforms,
        context,
        permutation,
        lambda: SplineCoupling(dim, None, bins, bound, hidden, activation, side),
        lambda c: ConditionalSplineCoupling(dim, c, None, bins, bound, hidden, activation, side),
    )


BUILDERS: dict[str, Callable[..., Flow]] = {
    "realnvp": realnvp,
    "nice": nice,
    "maf": maf,
    "iaf": iaf,
    "nsf": nsf,
}
