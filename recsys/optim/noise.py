"""Large-batch SGD with structured covariance noise (Wen, Luk, Gazeau, Zhang, Chan, Ba,
arXiv 1902.08234): ``θ ← θ − lr (g_B + ξ)``, ``Cov ξ = noise_scale² (1/B_S − 1/B) C`` with
``B`` the batch actually used, ``B_S = noise_batch`` the small batch whose gradient noise is
restored (no noise when ``B <= B_S``) and ``C`` built from the batch's *centred* per-example
gradients ``c_n = g_n − ḡ`` (the covariance of one example's gradient; constant terms such as
a weight penalty cancel):

- ``diag``: ``C = diag(mean_n c_n²)`` (the diagonal empirical Fisher, centred);
- ``full``: ``C = mean_n c_n c_nᵀ``, sampled without forming it: ``ξ = sqrt(coef/B) Σ_n z_n c_n``,
  ``z ~ N(0, I_B)`` shared by all parameters (so the noise is jointly correlated across them);
- ``isotropic``: ``σ² I`` with ``σ² = coef · tr(C) / numel`` per parameter (the control: same
  total variance as ``diag``/``full``, no structure).

Per-example gradients: `set_per_example_grads` (any parameter), or ``model=`` which hooks
``nn.Embedding`` (a row's per-example gradient is the gathered row's output gradient; repeated
lookups of the same indices are summed) and ``nn.Linear`` (``δ_n a_nᵀ``; inputs with extra
dimensions are summed over them per leading-dimension example). Parameters without
per-example gradients step as plain SGD, without noise (e.g. REC's prototype vectors and gate).
Embedding noise goes only to the rows the batch touched; sparse gradients stay sparse.
The noise comes from the optimizer's own generator (``seed``), saved in `state_dict`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from recsys.optim.capture import LayerCapture

STRUCTURES = ("diag", "full", "isotropic")
#: where the noise's covariance comes from: per-example gradients (`CovNoiseSGD`, plain SGD)
#: or sub-batch gradients (`SubBatchNoise`, any base optimizer)
NOISE_ESTIMATORS = ("per-example", "sub-batch")


@dataclass(frozen=True)
class NoiseConfig:
    """The ``cov-noise`` optimizer's options (`recsys.train.TrainConfig.noise`; command line
    ``--noise-batch``, ``--noise-structure``, ``--noise-scale``, ``--noise-estimator``,
    ``--noise-base``).

    ``batch``: the small batch ``B_S`` whose gradient noise is restored; ``structure``: the
    noise covariance (`STRUCTURES`); ``scale``: multiplier on the noise's standard deviation;
    ``estimator``: ``per-example`` gradients (`CovNoiseSGD`: SGD only) or ``sub-batch``
    gradients (`SubBatchNoise`: any ``base``); ``base``: the optimizer that steps."""

    batch: int = 256
    structure: str = "diag"
    scale: float = 1.0
    estimator: str = "per-example"
    base: str = "sgd"

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"noise_structure must be diag, full or isotropic, got {self.structure!r}")
        if self.estimator not in NOISE_ESTIMATORS:
            raise ValueError(f"noise_estimator must be one of {NOISE_ESTIMATORS}, got {self.estimator!r}")
        if self.batch < 1 or self.scale < 0:
            raise ValueError("need noise_batch >= 1, noise_scale >= 0")


class CovNoiseSGD(torch.optim.Optimizer):
    """Plain SGD (no momentum) plus covariance-structured noise (see the module docstring)."""

    def __init__(self, params, lr: float, *, noise_batch: int = 256, structure: str = "diag",
                 noise_scale: float = 1.0, model: nn.Module | None = None, seed: int = 0) -> None:
        if structure not in STRUCTURES:
            raise ValueError(f"unknown noise structure {structure!r}; choose one of {STRUCTURES}")
        if lr <= 0 or noise_batch < 1 or noise_scale < 0:
            raise ValueError("need lr > 0, noise_batch >= 1, noise_scale >= 0")
        super().__init__(params, dict(lr=lr, noise_batch=noise_batch, structure=structure,
                                      noise_scale=noise_scale))
        first = self.param_groups[0]["params"][0]
        self.generator = torch.Generator(device=first.device).manual_seed(seed)
        self._per_example: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.capture: LayerCapture | None = None
        if model is not None:
            self.attach(model)

    # ------------------------------------------------------------------ per-example gradients
    def set_per_example_grads(self, param: torch.Tensor, grads: torch.Tensor,
                              rows: torch.Tensor | None = None) -> None:
        """Per-example gradients for the next `step`: ``grads [B, *param.shape]``, or for an
        embedding table ``grads [B, d]`` with ``rows [B]`` the row each example touched."""
        if rows is None and grads.shape[1:] != param.shape:
            raise ValueError(f"per-example gradients {tuple(grads.shape)} do not match {tuple(param.shape)}")
        if rows is not None and (grads.dim() != 2 or rows.shape != grads.shape[:1]):
            raise ValueError("embedding per-example gradients must be [B, d] with rows [B]")
        self._per_example[param] = (grads.detach(), None if rows is None else rows.detach())

    def attach(self, model: nn.Module) -> None:
        """Hook ``model``'s embeddings and linear layers to collect per-example gradients."""
        if self.capture is not None:
            self.capture.remove()
        self.capture = LayerCapture((m, m) for m in model.modules()
                                    if isinstance(m, (nn.Embedding, nn.Linear)) and m.weight.requires_grad)

    def paused(self):
        """Forward/backward passes inside record nothing."""
        return self.capture.paused() if self.capture is not None else contextlib.nullcontext()

    def remove_hooks(self) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None

    def _collect(self) -> None:
        if self.capture is None:
            return
        for module in self.capture.modules:
            if isinstance(module, nn.Embedding):
                examples = self.capture.take_embedding(module, module.embedding_dim)
                if examples is not None:
                    rows, grads = examples
                    self.set_per_example_grads(module.weight, grads, rows)
                continue
            records = self.capture.take(module)
            if not records:
                continue
            w = b = None
            for a, g in records:
                batch = a.shape[0]
                a3 = a.reshape(batch, -1, a.shape[-1]).to(g.dtype)
                g3 = g.reshape(batch, -1, g.shape[-1]) * batch
                wi, bi = torch.einsum("bko,bki->boi", g3, a3), g3.sum(1)
                if w is not None and w.shape != wi.shape:
                    w = None  # calls over different example sets: no per-example gradient
                    break
                w, b = (wi, bi) if w is None else (w + wi, b + bi)
            if w is not None:
                self.set_per_example_grads(module.weight, w)
                if module.bias is not None and module.bias.requires_grad:
                    self.set_per_example_grads(module.bias, b)

    # ------------------------------------------------------------------ noise
    def _coef(self, group: dict, batch: int) -> float:
        return group["noise_scale"] ** 2 * max(0.0, 1.0 / group["noise_batch"] - 1.0 / batch)

    def noise_for(self, param: torch.Tensor, group: dict, z: torch.Tensor | None = None):
        """A draw of the noise for ``param`` from its per-example gradients: a dense tensor,
        or ``(rows, noise [rows, d])`` for an embedding table. ``z [B]``: the shared
        standard-normal combination for ``full`` (drawn here when None)."""
        grads, rows = self._per_example[param]
        batch = grads.shape[0]
        coef = self._coef(group, batch)
        structure = group["structure"]
        if structure == "full" and z is None:
            z = torch.randn(batch, generator=self.generator, device=grads.device, dtype=grads.dtype)
        if rows is None:
            mean = grads.mean(0)
            centred = grads - mean
            if structure == "full":
                return math.sqrt(coef / batch) * torch.tensordot(z.to(grads.dtype), centred, 1)
            var = centred.square().mean(0)
            std = var.sqrt() if structure == "diag" else (var.sum() / var.numel()).sqrt().expand_as(var)
            return math.sqrt(coef) * std * torch.randn(mean.shape, generator=self.generator,
                                                       device=grads.device, dtype=grads.dtype)
        touched, inverse = torch.unique(rows, return_inverse=True)
        zeros = torch.zeros(touched.numel(), grads.shape[1], device=grads.device, dtype=grads.dtype)
        mean = zeros.clone().index_add_(0, inverse, grads) / batch
        if structure == "full":
            combo = zeros.clone().index_add_(0, inverse, grads * z.to(grads.dtype)[:, None]) - z.sum() * mean
            return touched, math.sqrt(coef / batch) * combo
        var = (zeros.clone().index_add_(0, inverse, grads.square()) / batch - mean.square()).clamp_min(0)
        std = var.sqrt() if structure == "diag" else (var.sum() / var.numel()).sqrt().expand_as(var)
        return touched, math.sqrt(coef) * std * torch.randn(var.shape, generator=self.generator,
                                                            device=grads.device, dtype=grads.dtype)

    @torch.no_grad()
    def draw_noise(self) -> dict[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """One draw of the noise a step would add for the gradients captured since the last
        step (each parameter drawn on its own, as `noise_for` with its group), without
        stepping; the captured gradients are consumed. For studies of the noise itself."""
        self._collect()
        out = {p: self.noise_for(p, group) for group in self.param_groups for p in group["params"]
               if p in self._per_example}
        self._per_example = {}
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._collect()
        z = None
        batches = {g.shape[0] for g, _ in self._per_example.values()}
        if any(group["structure"] == "full" for group in self.param_groups) and len(batches) == 1:
            batch = batches.pop()
            first = next(iter(self._per_example.values()))[0]
            z = torch.randn(batch, generator=self.generator, device=first.device, dtype=first.dtype)
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()
                    p.index_add_(0, grad.indices()[0], grad.values(), alpha=-lr)
                else:
                    p.add_(grad, alpha=-lr)
                if p in self._per_example and group["noise_scale"] > 0:
                    noise = self.noise_for(p, group, z)
                    if isinstance(noise, tuple):
                        p.index_add_(0, noise[0], noise[1].to(p.dtype), alpha=-lr)
                    else:
                        p.add_(noise.to(p.dtype), alpha=-lr)
        self._per_example = {}
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["noise_rng"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop("noise_rng", None)
        super().load_state_dict(state_dict)
        if rng is not None:
            self.generator.set_state(rng)


class SubBatchNoise:
    """Covariance noise for models without cheap per-example gradients (the evidence-chain
    model, whose memoised chains share nodes between ratings), for any base optimizer.

    A large batch ``B_L`` is back-propagated as ``m`` sub-batches of ``B_S = noise_batch``
    ratings; `record` keeps each sub-batch's mean gradient ``g_j`` (flat, dense: meant for
    small parameter vectors, e.g. REC's ~16k). `apply` writes into ``.grad`` the large batch's
    gradient ``ḡ = Σ_j (n_j/B_L) g_j`` plus noise with the covariance of a small batch's
    deviation, ``noise_scale² (1/B_S − 1/B_L) C = noise_scale² (1 − 1/m) Cov(g_j)``, estimated from
    the ``g_j`` themselves: ``full``: ``sqrt((1 − 1/m)/(m − 1)) Σ_j z_j (g_j − ḡ)``; ``diag``:
    their per-coordinate variance; ``isotropic``: its mean. The base optimizer (Adam, SGD, ...)
    then steps on that gradient. Costs ``m`` backward passes per step instead of one.
    """

    def __init__(self, params, *, noise_batch: int = 256, structure: str = "diag", noise_scale: float = 1.0,
                 seed: int = 0) -> None:
        if structure not in STRUCTURES:
            raise ValueError(f"unknown noise structure {structure!r}; choose one of {STRUCTURES}")
        if noise_batch < 1 or noise_scale < 0:
            raise ValueError("need noise_batch >= 1, noise_scale >= 0")
        self.params = [p for p in params if p.requires_grad]
        self.noise_batch, self.structure, self.noise_scale = noise_batch, structure, noise_scale
        self.generator = torch.Generator(device=self.params[0].device).manual_seed(seed)
        self._grads: list[torch.Tensor] = []
        self._sizes: list[int] = []

    def record(self, size: int | None = None) -> None:
        """Take the gradient now in ``.grad`` (one sub-batch of ``size`` ratings, default
        ``noise_batch``) and clear ``.grad`` for the next sub-batch."""
        flat = []
        for p in self.params:
            g = p.grad
            if g is None:
                flat.append(torch.zeros(p.numel(), device=p.device, dtype=p.dtype))
            else:
                flat.append((g.to_dense() if g.is_sparse else g).reshape(-1).to(p.dtype))
            p.grad = None
        self._grads.append(torch.cat(flat))
        self._sizes.append(self.noise_batch if size is None else int(size))

    def record_gradient(self, flat: torch.Tensor, size: int | None = None) -> None:
        """Record one sub-batch's mean gradient given directly, flat ``[P]`` in the order of
        ``params`` (`record` takes it from ``.grad`` instead)."""
        self._grads.append(flat.detach())
        self._sizes.append(self.noise_batch if size is None else int(size))

    @torch.no_grad()
    def apply(self) -> None:
        """Write the recorded sub-batches' mean gradient plus noise into ``.grad`` (dense)."""
        if not self._grads:
            raise RuntimeError("SubBatchNoise.apply called before any record()")
        grads = torch.stack(self._grads)  # [m, P]
        weights = torch.tensor(self._sizes, dtype=grads.dtype, device=grads.device)
        m = grads.shape[0]
        mean = (weights / weights.sum()) @ grads
        total = mean.clone()
        if m > 1 and self.noise_scale > 0:
            centred = grads - mean
            keep = 1.0 - 1.0 / m
            if self.structure == "full":
                z = torch.randn(m, generator=self.generator, device=grads.device, dtype=grads.dtype)
                total += self.noise_scale * math.sqrt(keep / (m - 1)) * (z @ centred)
            else:
                var = centred.square().sum(0) / (m - 1)
                std = var.sqrt() if self.structure == "diag" else var.mean().sqrt().expand_as(var)
                z = torch.randn(mean.shape, generator=self.generator, device=grads.device, dtype=grads.dtype)
                total += self.noise_scale * math.sqrt(keep) * std * z
        offset = 0
        for p in self.params:
            p.grad = total[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self._grads, self._sizes = [], []

    def state_dict(self) -> dict:
        return {"noise_rng": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.generator.set_state(state_dict["noise_rng"])
