r"""Amortized flow posteriors for VAEs: an encoder drives a conditional flow q(z | x).

The posterior of every data point is the push-forward of a diagonal Gaussian whose
location and scale the encoder computes, through a flow conditioned on a context the
encoder also computes (Rezende & Mohamed 2015; Kingma et al. 2016):

.. math::
    (\mu, \sigma, h) = \mathrm{enc}(x), \qquad
    z_0 = \mu + \sigma \odot u,\ u \sim \mathcal N(0, I_d), \qquad
    z = T_h(z_0),

    \log q(z \mid x) = \log \mathcal N\big(z_0; \mu, \mathrm{diag}\,\sigma^2\big)
                       - \log\left|\det \partial T_h / \partial z_0\right|,

base to data, as every flow here. With ``flow=None`` it is the diagonal Gaussian
:math:`\mathcal N(\mu, \mathrm{diag}\,\sigma^2)` of a plain VAE, with the same encoder.

Use a flow that samples in one pass and scores its own samples from the layer caches:
``"iaf"`` (affine) or ``"nsf"`` (spline, IAF form by default here). Each SVI step then
costs one encoder pass and one conditioner pass per layer, and no inverse.

* :class:`Encoder`: :math:`x \mapsto (\mu, \sigma, h)`.
* :class:`AmortizedPosterior`: the encoder and the conditional flow; ``posterior(x)`` is a
  Pyro distribution with ``batch_shape == x.shape[:-1]`` and ``event_shape == (d,)``.
* :class:`AmortizedGuide`: the Pyro guide that samples ``z ~ q(z | x)`` inside the data
  plate (mini-batches and subsampling work).
* :func:`iwae_log_likelihood`: the importance-weighted estimate of :math:`\log p(x)`
  per data point (Burda et al. 2016), batched over particles and rows.

References:
    Rezende, Mohamed (2015). Variational Inference with Normalizing Flows. ICML.
    Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling (2016). Improved Variational
    Inference with Inverse Autoregressive Flow. NeurIPS.
    Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.plate_messenger import PlateMessenger
from pyro.poutine.runtime import _ENUM_ALLOCATOR, _PYRO_STACK
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.util import check_model_guide_match
from torch import nn
from torch.distributions import biject_to, constraints
from torch.nn import functional as F

from pyroflows._checks import (
    check_bool,
    check_choice,
    check_finite,
    check_hidden,
    check_number,
    check_positive_int,
    warn_from_caller,
)
from pyroflows._pickling import DropsParamStoreLinks
from pyroflows._pyro_module import RefusesPyroModule
from pyroflows.flows import Flow, FlowDistribution, iaf, nsf
from pyroflows.infer._param_store import MirrorsParamStore, register

POSTERIOR_FLOWS = ("iaf", "nsf", None)
_SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_ONE) == 1


class Encoder(RefusesPyroModule, DropsParamStoreLinks, nn.Module):
    r"""The amortized part of q(z | x): :math:`x \mapsto (\mu(x), \sigma(x), h(x))`.

    A multilayer perceptron (or a ``body`` of your own, e.g. a convolutional net) whose
    last hidden features feed three linear heads: the location :math:`\mu`, the scale
    :math:`\sigma = \mathrm{softplus}(\cdot) + \sigma_{\min}` and the context :math:`h`.
    The location head starts at 0 and the softplus of the scale head at 1, so an untrained
    encoder gives :math:`\mathcal N(0, (1 + \sigma_{\min})^2 I)`: the prior of a standard
    VAE, :math:`\mathcal N(0, I)`, up to the floor.

    Shapes: ``x`` is ``(*B, input_dim)`` (or whatever ``body`` takes, with ``B`` its
    leading dims); ``loc`` and ``scale`` are ``(*B, latent_dim)``, ``context`` is
    ``(*B, context)`` or ``None`` when ``context == 0``.

    Args:
        input_dim: features of a data point (ignored when ``body`` is given).
        latent_dim: size ``d`` of ``z``.
        hidden: hidden sizes of the default MLP body.
        context: size of the flow's context ``h`` (0: none, for a Gaussian posterior).
        activation: non-linearity class of the default body.
        body: a module mapping ``x`` to features ``(*B, body_features)``, used instead of
            the MLP.
        body_features: the size of ``body``'s output (required with ``body``).
        min_scale: the floor :math:`\sigma_{\min}` added to every scale.

    Example:
        >>> enc = Encoder(64, latent_dim=8, hidden=(32,), context=4)
        >>> [tuple(t.shape) for t in enc(torch.zeros(5, 64))]
        [(5, 8), (5, 8), (5, 4)]
    """

    def __init__(
        self,
        input_dim: int | None,
        latent_dim: int,
        hidden: Sequence[int] = (256,),
        context: int = 16,
        activation: Callable[[], nn.Module] = nn.ReLU,
        body: nn.Module | None = None,
        body_features: int | None = None,
        min_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.context_features = check_positive_int(context, "context", minimum=0)
        self.min_scale = check_number(min_scale, "min_scale", strict=False)
        own_body = body is None
        if body is None:
            if body_features is not None:
                raise ValueError("body_features is only for a body of your own; pass body too")
            self.input_dim = check_positive_int(input_dim, "input_dim")
            layers: list[nn.Module] = []
            width = self.input_dim
            for size in check_hidden(hidden):
                layers += [nn.Linear(width, size), activation()]
                width = size
            body = nn.Sequential(*layers)
        else:
            if not isinstance(body, nn.Module):
                raise TypeError(f"body must be an nn.Module, got {type(body).__name__}")
            self.input_dim = input_dim
            width = check_positive_int(body_features, "body_features")
        self._own_body = own_body
        self.body = body
        self.loc = nn.Linear(width, self.latent_dim)
        self.scale = nn.Linear(width, self.latent_dim)
        self.context = nn.Linear(width, self.context_features) if self.context_features else None
        for head in (self.loc, self.scale):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        nn.init.constant_(self.scale.bias, _SOFTPLUS_ONE)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return ``(loc, scale, context)`` for the data points ``x``.

        With distribution validation on (torch's default; ``pyro.enable_validation(False)``
        turns it off) NaN or infinite values in ``x`` are a ``ValueError``.
        """
        if self._own_body:
            _check_rows(x, "x", self.input_dim, self.loc.weight)
        if isinstance(x, torch.Tensor) and torch.distributions.Distribution._validate_args:
            check_finite(x, "x", "the encoder would give those rows NaN posteriors")
        features = self.body(x)
        if not self._own_body:
            _check_body_output(features, self.loc.in_features)
        loc = self.loc(features)
        scale = F.softplus(self.scale(features)) + self.min_scale
        context = self.context(features) if self.context is not None else None
        return loc, scale, context


def _check_body_output(features: object, width: int) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"body must return a tensor of features, got {type(features).__name__}")
    if features.dim() == 0 or features.shape[-1] != width:
        raise ValueError(
            f"body returned features of shape {tuple(features.shape)} but the encoder was "
            f"built with body_features={width}: pass the size of the body's last dim"
        )


def _check_rows(x: object, name: str, dim: int, like: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (*batch, {dim}), got {type(x).__name__}"
        )
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (*batch, {dim}), got {tuple(x.shape)}")
    if x.dtype != like.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the encoder's parameters are {like.dtype}; no "
            f"silent cast is made: pass {name}.to({like.dtype}) or convert the module"
        )


class AmortizedPosterior(RefusesPyroModule, DropsParamStoreLinks, nn.Module):
    r"""q(z | x): an :class:`Encoder` and a conditional :class:`~pyroflows.Flow` (or none).

    ``posterior(x)`` returns the distribution of ``z`` for every row of ``x``: a
    :class:`~pyroflows.FlowDistribution` over the base
    :math:`\mathcal N(\mu(x), \mathrm{diag}\,\sigma(x)^2)` through the flow conditioned on
    :math:`h(x)` (see the module's formula), or that Gaussian itself without a flow.

    Cost: one encoder pass, then the flow's sampling direction (``iaf``: one MADE pass a
    layer); scoring the flow's own draws is free (cached), scoring other points runs the
    flow's inverse.

    Args:
        encoder: the :class:`Encoder`; its ``context`` must equal the flow's.
        flow: a conditional flow of size ``encoder.latent_dim``, or ``None``.

    Example:
        >>> q = amortized_posterior(64, latent_dim=8, flow="iaf", hidden=(32,))
        >>> d = q(torch.zeros(5, 64))
        >>> d.batch_shape, d.event_shape, d.rsample().shape
        (torch.Size([5]), torch.Size([8]), torch.Size([5, 8]))
    """

    def __init__(self, encoder: Encoder, flow: Flow | None = None) -> None:
        super().__init__()
        if not isinstance(encoder, Encoder):
            raise TypeError(f"encoder must be a pyroflows Encoder, got {type(encoder).__name__}")
        if flow is not None:
            if not isinstance(flow, Flow):
                raise TypeError(f"flow must be a pyroflows.Flow or None, got {type(flow).__name__}")
            if flow.dim != encoder.latent_dim:
                raise ValueError(
                    f"flow acts on dim {flow.dim} but the encoder's latent_dim is "
                    f"{encoder.latent_dim}"
                )
            if flow.context_features != encoder.context_features:
                raise ValueError(
                    f"flow takes a context of size {flow.context_features} but the encoder "
                    f"makes one of size {encoder.context_features}"
                )
        self.encoder = encoder
        self.flow = flow

    @property
    def latent_dim(self) -> int:
        """Size ``d`` of ``z``."""
        return self.encoder.latent_dim

    def forward(self, x: torch.Tensor, nesting: int = 0) -> dist.TorchDistribution:
        """The distribution q(z | x), ``batch_shape`` the encoder's batch of ``x``.

        ``nesting``: singleton batch dims put after the data points (``batch + (1,) *
        nesting``), for a data plate at ``dim = -1 - nesting`` with plates nested inside
        it. The encoder's outputs are reshaped, not ``x``, so an image encoder works too.
        """
        loc, scale, context = self.encoder(x)
        if nesting:
            loc, scale, context = (
                None if t is None else t.reshape(*t.shape[:-1], *([1] * nesting), t.shape[-1])
                for t in (loc, scale, context)
            )
        base = dist.Normal(loc, scale).to_event(1)
        if self.flow is None:
            return base
        transforms = (
            self.flow(context).transforms if self.flow.conditional else list(self.flow.transforms)
        )
        return FlowDistribution(base, transforms)


def amortized_posterior(
    input_dim: int,
    latent_dim: int,
    flow: str | None = "iaf",
    hidden: Sequence[int] = (256,),
    context: int = 16,
    transforms: int = 2,
    flow_hidden: Sequence[int] | None = None,
    activation: Callable[[], nn.Module] = nn.ReLU,
    **flow_options: Any,
) -> AmortizedPosterior:
    r"""Build q(z | x) in one line: an MLP :class:`Encoder` and a conditional flow.

    Args:
        input_dim: features of a data point.
        latent_dim: size ``d`` of ``z``.
        flow: ``"iaf"`` (affine IAF), ``"nsf"`` (spline; IAF form unless
            ``autoregressive=`` says otherwise) or ``None`` (diagonal Gaussian).
        hidden: the encoder's hidden sizes.
        context: size of the context the encoder hands the flow (ignored without a flow).
        transforms: flow layers.
        flow_hidden: hidden sizes of each flow conditioner (default ``(4d, 4d)``, at
            least 16 wide).
        activation: non-linearity class of the encoder and the flow.
        **flow_options: passed to the builder: ``clamp`` and ``permutation`` for both;
            for ``"nsf"`` also ``bins``, ``bound``, ``autoregressive`` (``"iaf"`` unless
            given) and ``side`` (``"base"`` unless given).
    """
    check_choice(flow, "flow", POSTERIOR_FLOWS)
    if flow is None:
        shaping = [
            name
            for name, given in (
                ("transforms", transforms != 2),
                ("flow_hidden", flow_hidden is not None),
            )
            if given
        ]
        if flow_options or shaping:
            raise ValueError(
                f"flow options {sorted([*flow_options, *shaping])} given without a flow "
                f"(flow=None is a diagonal Gaussian)"
            )
        encoder = Encoder(input_dim, latent_dim, hidden, 0, activation)
        return AmortizedPosterior(encoder)
    check_positive_int(context, "context")
    width = max(16, 4 * check_positive_int(latent_dim, "latent_dim"))
    options = {
        "transforms": transforms,
        "hidden": check_hidden(flow_hidden, "flow_hidden")
        if flow_hidden is not None
        else (width, width),
        "context": context,
        "activation": activation,
        **flow_options,
    }
    if flow == "nsf":
        options.setdefault("autoregressive", "iaf")
        options.setdefault("side", "base")  # a posterior samples: the closed form samples
    built = (iaf if flow == "iaf" else nsf)(latent_dim, **options)
    return AmortizedPosterior(Encoder(input_dim, latent_dim, hidden, context, activation), built)


#: set while :func:`iwae_log_likelihood` runs: every AmortizedGuide then takes the rows
#: it is given as they are, once each (its ``size`` and ``subsample_size`` aside); a
#: context variable, so an SVI step in another thread keeps its scaling
_EVERY_ROW_ONCE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pyroflows_every_row_once", default=False
)


class AmortizedGuide(RefusesPyroModule, MirrorsParamStore, DropsParamStoreLinks, nn.Module):
    r"""A Pyro guide that samples ``z ~ q(z | x)`` for every row of ``x`` in a plate.

    ``guide(x, *args, **kwargs)`` registers the posterior's parameters with
    ``pyro.module`` and samples site ``site`` inside ``pyro.plate(plate, ...)``, so the
    model must sample the same site inside a plate of the same name and dim. Extra
    arguments (the model's) are ignored. Three ways to batch:

    * ``size=None`` (default): ``x`` is the batch, the plate has ``len(x)`` rows, and the
      ELBO is that of the batch (a model that subsamples its plate scales its own
      sites by ``N / len(x)`` and this guide's not: give ``size``).
    * ``size=N`` and ``len(x) <= N``: ``x`` is a mini-batch of an ``N``-row data set, drawn
      by the caller; the guide's plate has ``N`` rows and ``len(x)`` in the batch, so the
      ELBO is scaled by ``N / len(x)`` (an unbiased estimate of the full data set's when
      the batch is drawn at random). The model opens its plate with the batch's own
      indices, ``pyro.plate(plate, N, subsample=idx)``, and keeps them: the guide, which
      does not know them, records none for the model to replay (with any ``size``, a
      shuffled batch of all ``N`` rows included). The model must do so:
      a model whose plate is ``pyro.plate(plate, len(x))`` scores the batch at scale 1
      while the guide scales it by ``N / len(x)``, and SVI, which cannot see the
      difference, fits a posterior too wide (about ``sqrt(N / len(x))`` times), silently.
    * ``size=N``, ``len(x) == N`` and ``subsample_size=B``: the guide draws ``B`` row
      indices, ``with pyro.plate(plate, N, subsample_size=B) as idx``, and encodes
      ``x[idx]``; the model's plate of the same name gets the same ``idx``.

    Called inside a ``pyro.plate`` of the same name that the caller opened (a guide with
    other local latents, e.g. the label of a semi-supervised VAE), it samples in that
    plate, which does the scaling and subsampling: ``x`` must hold that plate's rows
    (``x[idx]`` when it subsamples), and ``size`` and ``subsample_size`` are not used.
    There ``x`` may have batch dims left of the rows (an enumerated label, or particles,
    broadcast into the encoder's input): ``z`` then has them too.

    The rows of ``x`` are the encoder's batch: ``x`` of shape ``(rows, features)`` for an
    MLP encoder, ``(rows, C, H, W)`` for an image encoder, whatever the plate's ``dim``.

    Args:
        posterior: the :class:`AmortizedPosterior`.
        site: name of the latent site.
        plate: name of the data plate.
        dim: the plate's dim (``-1`` unless the model nests plates inside it).
        size: the data set's number of rows, for scaling.
        subsample_size: rows to draw per step when the guide gets the whole data set.
        name: the prefix of the parameters' names (as ``pyro.module(name, ...)``).
        support: the model site's support, when it is not all of :math:`\mathbb R^d`
            (``constraints.positive`` for a Gamma or LogNormal ``z``,
            ``constraints.simplex`` for a Dirichlet one): ``z`` is then the posterior's
            draw mapped onto it by ``biject_to(support)``, with the change of variables in
            :math:`\log q` (``exp`` for positive; stick-breaking for the simplex, whose
            ``z`` has ``latent_dim + 1`` entries). Default: ``z`` on :math:`\mathbb R^d`.
        register: state the parameters as Pyro param sites at every call, as
            ``pyro.module`` does (needed by ``SVI`` with a ``pyro.optim`` optimizer);
            ``False`` when a torch optimizer steps ``guide.parameters()`` itself, which
            saves that cost per step (run by ``SVI.step`` so, a ``UserWarning`` says once
            that it will not train). While registering, the posterior's whole
            ``state_dict`` (buffers too) is kept in Pyro's param store, so
            ``pyro.get_param_store().save`` and ``load`` restore it: values a loaded
            store holds under ``name`` are copied into the posterior at the next call
            (unlike a plain ``pyro.module``, which would leave them unused and the
            posterior untrained). The store must hold the whole posterior; one left by
            another guide of the same name in this process is taken over, not read (a
            copy of a guide leaves it to the live guide that holds it, and still
            trains, but without store names, so ``pyro.optim`` cannot save its state);
            two guides of one name in one run are refused.

    Example:
        >>> q = amortized_posterior(3, latent_dim=2, flow="iaf", hidden=(8,))
        >>> guide = AmortizedGuide(q)
        >>> trace = pyro.poutine.trace(guide).get_trace(torch.zeros(4, 3))
        >>> trace.nodes["z"]["value"].shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        posterior: AmortizedPosterior,
        site: str = "z",
        plate: str = "data",
        dim: int = -1,
        size: int | None = None,
        subsample_size: int | None = None,
        name: str = "guide",
        register: bool = True,
        support: constraints.Constraint | None = None,
    ) -> None:
        super().__init__()
        if support is not None:
            if not isinstance(support, constraints.Constraint):
                raise TypeError(
                    f"support must be a torch.distributions.constraints.Constraint (the model "
                    f"site's, e.g. constraints.positive) or None, got {support!r}"
                )
            try:
                biject_to(support)
            except NotImplementedError:
                raise ValueError(
                    f"support={support} has no bijection from the reals (biject_to): the "
                    f"guide cannot draw on it"
                ) from None
        if not isinstance(posterior, AmortizedPosterior):
            raise TypeError(
                f"posterior must be an AmortizedPosterior, got {type(posterior).__name__}"
            )
        for argument, value in (("site", site), ("plate", plate), ("name", name)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"{argument} must be a non-empty str, got {value!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim >= 0:
            raise ValueError(f"dim must be a negative int (a plate dim), got {dim!r}")
        if size is not None:
            check_positive_int(size, "size")
        if subsample_size is not None:
            check_positive_int(subsample_size, "subsample_size")
            if size is None:
                raise ValueError("subsample_size needs size, the number of rows of the data set")
            if subsample_size > size:
                raise ValueError(
                    f"subsample_size={subsample_size} is more than size={size}, the rows of "
                    f"the data set"
                )
        self.posterior = posterior
        self.site, self.plate, self.dim = site, plate, dim
        self.size, self.subsample_size, self.name = size, subsample_size, name
        self.register = check_bool(register, "register")
        self.support = support

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Sample ``z`` for the rows of ``x`` (or for a subsample of them); return it."""
        if self.register:
            owner = f"AmortizedGuide(name={self.name!r})"
            self._mirror()({self.name: self.posterior}, owner=owner)
            register({self.name: self.posterior})
        elif not self.__dict__.get("_told_unregistered") and _under_svi_step(self.posterior):
            self._told_unregistered = True
            warn_from_caller(
                f"AmortizedGuide(name={self.name!r}, register=False) is run by SVI.step, whose "
                "pyro.optim optimizer steps the parameters in Pyro's param store: this "
                "guide's are not there, so it will not train. Build it with register=True, "
                "or step guide.parameters() with a torch optimizer yourself"
            )
        rows = _row_count(x)
        if rows == 0:
            raise ValueError(f"x has no rows (shape {tuple(x.shape)}): nothing to sample z for")
        enclosing = _active_plate(self.plate)
        if enclosing is not None:  # the caller's own data plate, shared with its latents
            self._check_enclosing(enclosing)
            return pyro.sample(self.site, self._posterior(x, enclosing.subsample_size, True))
        # the rows' indices are the model's (the guide does not know them): its plate site
        # is hidden, or the model, replayed, would be handed 0..rows-1 for its own (a
        # shuffled batch of all N rows too)
        index = torch.arange(rows, device=x.device)
        if self.size is None or _EVERY_ROW_ONCE.get():
            with (
                poutine.block(hide=[self.plate]),
                pyro.plate(self.plate, rows, subsample=index, dim=self.dim),
            ):
                return pyro.sample(self.site, self._posterior(x, rows))
        if rows > self.size:
            raise ValueError(
                f"x has {rows} rows but the guide was told size={self.size}, the rows of the "
                f"data set; for other data (a test set), use a guide without size, "
                f"AmortizedGuide(guide.posterior, register=False) with the same site, plate "
                f"and dim"
            )
        if rows < self.size and self.subsample_size is not None:
            raise ValueError(
                f"x has {rows} rows, fewer than size={self.size}: a mini-batch, but the "
                f"guide was built with subsample_size={self.subsample_size} to draw its "
                f"own from the whole data set; pass all {self.size} rows, or build it "
                f"without subsample_size"
            )
        if self.subsample_size is None:  # a mini-batch (or all rows): scaled by size / rows
            with (
                poutine.block(hide=[self.plate]),
                pyro.plate(self.plate, self.size, subsample=index, dim=self.dim),
            ):
                return pyro.sample(self.site, self._posterior(x, rows))
        with pyro.plate(
            self.plate, self.size, subsample_size=self.subsample_size, dim=self.dim
        ) as index:
            return pyro.sample(self.site, self._posterior(x[index], len(index)))

    def _check_enclosing(self, plate: Any) -> None:
        if self.subsample_size is not None:
            raise ValueError(
                f"the guide was built with subsample_size={self.subsample_size} but is called "
                f"inside a plate {self.plate!r} of the caller's, which does the subsampling: "
                f"build it without subsample_size and pass x[idx] of that plate's indices"
            )
        if plate.dim != self.dim:
            raise ValueError(
                f"the enclosing plate {self.plate!r} has dim={plate.dim} but the guide was "
                f"built with dim={self.dim}"
            )

    def _posterior(
        self, x: torch.Tensor, rows: int, leading: bool = False
    ) -> dist.TorchDistribution:
        """q(z | x), checked to have ``rows`` batch entries at the plate's dim.

        ``leading``: batch dims left of the rows are allowed (inside the caller's plate:
        an enumerated or particle dim broadcast into ``x``).
        """
        nesting = -self.dim - 1
        d = self.posterior(x, nesting)
        batch = tuple(d.batch_shape)
        at = len(batch) - 1 - nesting  # where the data points are
        outer_ok = at == 0 or (leading and _outer(batch[:at], self.dim))
        if at < 0 or batch[at] != rows or not outer_ok:
            where = "the enclosing plate" if leading else "the plate"
            raise ValueError(
                f"x of shape {tuple(x.shape)} gives q(z | x) with batch shape {batch}: "
                f"{where} {self.plate!r} has {rows} rows, and the guide needs the data "
                f"points along x's first dim"
                f"{' (after any enumerated or particle dims)' if leading else ''}, one per "
                f"row (x[idx] when the plate subsamples); for a single data point pass x[None]"
            )
        if self.__dict__.get("support") is not None:  # (guides pickled before the option)
            # cached, so that scoring the guide's own draw inverts neither the bijection
            # nor, with it, the flow (an IAF's inverse is D passes a layer)
            d = dist.TransformedDistribution(d, [biject_to(self.support).with_cache(1)])
        return d


def _outer(dims: tuple[int, ...], plate_dim: int) -> bool:
    """Whether batch dims left of the data points are Pyro's, not a wrongly shaped ``x``.

    Each must be of size 1, or at the dim of an open plate of its size (vectorized
    particles, the caller's outer plates), or at an enumeration dim (``TraceEnum_ELBO``).
    Pyro itself would not catch another left of ``max_plate_nesting``.
    """
    # a subsampled plate's batch dim is its subsample's size
    plates = {m.dim: m.subsample_size for m in _PYRO_STACK if isinstance(m, PlateMessenger)}
    # the allocator keeps its dims after the run: they count while an enumeration runs
    enumerating = any(isinstance(m, EnumMessenger) for m in _PYRO_STACK)
    enumerated = getattr(_ENUM_ALLOCATOR, "dim_to_id", {}) if enumerating else {}
    for i, size in enumerate(dims):
        dim = plate_dim - len(dims) + i  # the dims just left of the data plate's
        if size != 1 and plates.get(dim) != size and dim not in enumerated:
            return False
    return True


def _under_svi_step(module: nn.Module) -> bool:
    """Whether ``SVI.step`` collects param sites but has not seen ``module``'s parameters.

    ``SVI.step`` runs the loss under ``poutine.trace(param_only=True)``; a caller's own
    ``pyro.module(name, guide)`` before the call puts the parameters there.
    """
    collecting = [m for m in _PYRO_STACK if isinstance(m, TraceMessenger) and m.param_only]
    if not collecting:
        return False
    seen = {
        id(site["value"])
        for messenger in collecting
        for site in messenger.trace.nodes.values()
        if site["type"] == "param"
    }
    return not any(id(p) in seen for p in module.parameters())


def _row_count(x: object) -> int:
    """The number of data points in ``x`` (its first dim), or a clear error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"x must be a torch.Tensor with the data points along its first dim, got "
            f"{type(x).__name__}; convert it with torch.as_tensor(x, dtype=torch.float32)"
        )
    if x.dim() == 0:
        raise ValueError("x must have the data points along its first dim, got a 0-d tensor")
    return x.shape[0]


def _active_plate(name: str) -> Any:
    """The ``pyro.plate`` named ``name`` that the caller has open around us, if any."""
    for messenger in _PYRO_STACK:
        if isinstance(messenger, PlateMessenger) and messenger.name == name:
            return messenger
    return None


def _plate_nesting(model, guide, x, kwargs, plate: str) -> tuple[int, frozenset[str]]:
    """The most plate dims any site of ``model`` or ``guide`` uses (on the rows ``x``).

    And the latent sites of the model to sum out: those it enumerates in parallel
    (``config_enumerate``) that the guide does not draw, each in the data plate
    ``plate`` alone (one in a plate nested in it, such as a pixel's assignment, would
    need the sum taken inside that plate's product; refused).
    """
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(x, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, **kwargs)
    deepest = 0
    for trace in (guide_trace, model_trace):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        deepest = max(deepest, -frame.dim)
    summed = frozenset(
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and name not in guide_trace.nodes
        and site["infer"].get("enumerate") == "parallel"
        and getattr(site["fn"], "has_enumerate_support", False)
    )
    for name in sorted(summed):
        plates = {f.name for f in model_trace.nodes[name]["cond_indep_stack"] if f.vectorized}
        if plates != {plate}:
            raise ValueError(
                f"the model enumerates site {name!r} in plate(s) {sorted(plates)}; "
                f"iwae_log_likelihood sums such a site out of each row's weight only when it "
                f"sits in the data plate {plate!r} alone (one per row)"
            )
    return deepest, summed


def _row_log_prob(
    site: dict, plate: str, particle_dim: int, rows: int, enumerated: int = 0
) -> torch.Tensor:
    """``log p`` of one site, summed to shape ``(particles, rows)`` (mask applied).

    With ``enumerated`` dims left of the particle dim (``poutine.enum``'s), they are kept:
    shape ``(*enumerated, particles, rows)``.
    """
    frame = next((f for f in site["cond_indep_stack"] if f.name == plate), None)
    if frame is None:
        raise ValueError(
            f"site {site['name']!r} is not inside plate {plate!r}: the importance-weighted "
            f"likelihood per data point needs every sample site of the model and guide in "
            f"the data plate (pass plate= the name of your data plate)"
        )
    log_p = scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"])
    width = enumerated - particle_dim
    log_p = log_p.reshape((1,) * (width - log_p.dim()) + log_p.shape)
    data_axis = width + frame.dim
    if log_p.shape[data_axis] not in (1, rows):
        raise ValueError(
            f"plate {plate!r} has {log_p.shape[data_axis]} rows at site {site['name']!r} but "
            f"x has {rows}: evaluate without subsampling (size=None)"
        )
    keep = (*range(enumerated + 1), data_axis)
    other = tuple(i for i in range(width) if i not in keep)
    if other:
        log_p = log_p.sum(other)
    return log_p


def iwae_log_likelihood(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: torch.Tensor,
    num_samples: int = 1000,
    *,
    plate: str = "data",
    max_batch: int = 2**15,
    **kwargs: Any,
) -> torch.Tensor:
    r"""Importance-weighted estimate of :math:`\log p(x_n)` for every row of ``x``.

    .. math::
        \hat{\mathcal L}_k(x_n) = \log \frac1k \sum_{i=1}^k
        \frac{p(x_n, z_i)}{q(z_i \mid x_n)}, \qquad z_i \sim q(\cdot \mid x_n),

    a lower bound on :math:`\log p(x_n)` in expectation that tightens as ``k`` grows and
    equals the ELBO in expectation at ``k = 1`` (Burda et al. 2016). The guide is drawn
    from and the model replayed under a vectorized particle plate (outside every plate
    of the model), in passes of at most ``max_batch`` (particle, row) pairs, so
    ``k = 1000`` on thousands of rows fits in memory; the passes are combined with a
    running log-sum-exp. Everything runs under ``torch.no_grad()``.

    ``model(x, **kwargs)`` and ``guide(x, **kwargs)`` must put every sample site (the
    latents and the observations) in the plate named ``plate`` over the rows of ``x``,
    without subsampling. Site scales (``poutine.scale``, a subsampled plate) are ignored:
    each row counts once, and an :class:`AmortizedGuide` built with ``size`` (for SVI's
    scaling) takes ``x`` as it is, more rows than ``size`` too (a test set). A keyword
    argument that is a tensor with one entry per row of ``x`` (first dim ``len(x)``: labels,
    covariates) is sliced with ``x`` when the rows take several passes. A discrete latent
    the model enumerates in parallel (``config_enumerate``, for ``TraceEnum_ELBO``) and the
    guide does not draw is summed out of each row's weight, :math:`\log \sum_c p(x_n, z_i,
    c) - \log q(z_i \mid x_n)`; it must sit in the data plate.

    Args:
        model: the Pyro model.
        guide: its guide, e.g. an :class:`AmortizedGuide`.
        x: the data points, rows along the first dim.
        num_samples: importance samples ``k`` per row.
        plate: the name of the data plate.
        max_batch: most (particle, row) pairs per pass.
        **kwargs: passed to ``model`` and ``guide``.

    Returns:
        A tensor of shape ``(len(x),)``; take ``.mean()`` for the mean per data point.
    """
    check_positive_int(num_samples, "num_samples")
    check_positive_int(max_batch, "max_batch")
    if isinstance(guide, AmortizedGuide) and guide.subsample_size is not None:
        raise ValueError(
            f"guide was built with subsample_size={guide.subsample_size}, which draws rows "
            f"for the model's plate; iwae_log_likelihood scores every row of x once: pass "
            f"a guide without it, AmortizedGuide(guide.posterior, register=False) with the "
            f"same site, plate and dim, and a model whose plate takes every row"
        )
    n = _row_count(x)
    if n == 0:
        raise ValueError("x has no rows")
    with torch.no_grad(), _every_row_once():  # a guide's size is for SVI's scaling
        rows_per_pass = max(1, min(n, max_batch))
        first = _row_kwargs(kwargs, 0, rows_per_pass, n)
        nesting, summed = _plate_nesting(model, guide, x[:rows_per_pass], first, plate)
        particle_dim = -(nesting + 1)
        if summed:  # summed out of each row's weight, left of the particles
            model = poutine.enum(model, first_available_dim=particle_dim - 1)
        out = []
        for start in range(0, n, rows_per_pass):
            chunk = x[start : start + rows_per_pass]
            rows = chunk.shape[0]
            chunk_kwargs = _row_kwargs(kwargs, start, start + rows, n)
            per_pass = max(1, min(num_samples, max_batch // rows))
            total: torch.Tensor | None = None
            done = 0
            while done < num_samples:
                m = min(per_pass, num_samples - done)
                log_w = _log_weights(model, guide, chunk, m, plate, particle_dim, chunk_kwargs)
                part = torch.logsumexp(log_w, 0)
                total = part if total is None else torch.logaddexp(total, part)
                done += m
            out.append(total - math.log(num_samples))
        return torch.cat(out)


def _spelled(support: constraints.Constraint) -> str:
    """How a user writes ``support``: ``constraints.positive``, or its repr."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    for name in dir(constraints):
        if getattr(constraints, name) is support:
            return f"constraints.{name}"
    return repr(support)


@contextlib.contextmanager
def _every_row_once():
    """While it lasts, an :class:`AmortizedGuide` scores the rows it is given once each."""
    token = _EVERY_ROW_ONCE.set(True)
    try:
        yield
    finally:
        _EVERY_ROW_ONCE.reset(token)


def _row_kwargs(kwargs: dict[str, Any], start: int, stop: int, n: int) -> dict[str, Any]:
    """``kwargs`` for rows ``start:stop`` of ``x``: per-row tensors (first dim ``n``) sliced.

    Nothing is sliced when the pass holds every row, so a tensor that merely happens to
    have ``n`` entries is passed as it is whenever ``x`` fits in one pass.
    """
    if start == 0 and stop >= n:
        return kwargs
    return {
        key: value[start:stop]
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n
        else value
        for key, value in kwargs.items()
    }


def _log_weights(model, guide, x, particles, plate, particle_dim, kwargs) -> torch.Tensor:
    """``log p(x_n, z) - log q(z | x_n)``, shape ``(particles, rows)``."""
    rows = x.shape[0]
    with pyro.plate("_iwae_particles", particles, dim=particle_dim):
        guide_trace = poutine.trace(guide).get_trace(x, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, **kwargs)
    dims = [
        site["infer"]["_enumerate_dim"]
        for site in model_trace.nodes.values()
        if site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None
    ]
    enumerated = set(dims)
    if len(enumerated) < len(dims):
        raise ValueError(
            "the model's enumerated sites share dims (pyro.markov reuses them), which "
            "iwae_log_likelihood's sum over each row's values does not follow"
        )
    latent = {
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not isinstance(site["fn"], _Subsample)
        and site["infer"].get("_enumerate_dim") is None
    }
    drawn = {
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not isinstance(site["fn"], _Subsample)
    }
    if latent != drawn:
        raise ValueError(
            f"the model's latent sites {sorted(latent)} and the guide's sites {sorted(drawn)} "
            f"differ: importance weights need the guide to draw every latent of the model "
            f"(a discrete one the model enumerates in parallel, config_enumerate, it may "
            f"leave to be summed out)"
        )
    # the shapes, as SVI's losses check them (the particle dim left of the plates aside):
    # a guide whose plate has another dim would broadcast against the model into a grid
    # of rows, and the weights would sum the wrong axis (~100 nats off)
    check_model_guide_match(model_trace, guide_trace, max_plate_nesting=-particle_dim - 1)
    for name in sorted(drawn):  # with Pyro's validation off, nothing else would say so
        site = model_trace.nodes[name]
        try:
            inside = bool(site["fn"].support.check(site["value"]).all())
        except NotImplementedError:  # a distribution that declares no support
            inside = True
        if not inside:
            raise ValueError(
                f"the guide's draws of site {name!r} fall outside its support in the model, "
                f"{site['fn'].support}: the weights would mean nothing; draw on it, e.g. "
                f"AmortizedGuide(..., support={_spelled(site['fn'].support)})"
            )
    width = -min(enumerated) + particle_dim if enumerated else 0  # enumerated dims
    log_w = x.new_zeros((1,) * width + (particles, rows))
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in trace.nodes.values():
            if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                continue
            if sign < 0 and site["is_observed"]:
                continue
            if site["infer"].get("_deterministic"):  # pyro.deterministic: log-density 0
                continue
            log_w = log_w + sign * _row_log_prob(site, plate, particle_dim, rows, width)
    # sum p over the enumerated values, row by row: log sum_c p(x_n, z, c) - log q(z | x_n)
    return torch.logsumexp(log_w, tuple(range(width))) if width else log_w
