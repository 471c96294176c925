"""K-FAC, EKFAC, TKFAC and TEKFAC: one Kronecker-factored preconditioner family for
``nn.Linear`` layers and ``nn.Embedding`` tables.

`KFACPreconditioner` hooks the modules, records their inputs ``a`` and output gradients
during ``backward``, and its `step` rewrites their ``.grad`` in place; any torch optimizer
(SGD by default, see `recsys.optim.factory`) then steps. Parameters of other modules are left
alone (plain gradient).

Statistics (per recorded row ``n``; ``δ_n = scale · ∂L/∂out_n`` with ``scale`` the batch size,
so that ``δ_n`` is the per-example output gradient of a mean loss). Which loss, ``statistic``:

- ``"fisher"`` (default): the true Fisher of the model's Gaussian rating likelihood, by one
  Monte-Carlo sample: targets ``ŷ = outputs + z``, ``z ~ N(0, I)``, back-propagated through the
  model's ``outputs`` (`RatingModel.loss_terms`), so ``δ_n = J_nᵀ z_n`` and ``E[δδᵀ]`` is the
  Gauss–Newton matrix, whatever the residuals. Costs one extra backward per step
  (`backward`).
- ``"empirical"``: the real loss's gradients (the residuals): no extra pass, but the factors
  shrink with the residuals, so steps grow as the fit improves (unstable at ordinary rates).

- ``kfac``: ``A = E[a aᵀ]``, ``G = E[δ δᵀ]``;
  ``ΔW = (G + γ_G I)⁻¹ ∇W (A + γ_A I)⁻¹`` in the eigenbases of A and G.
- ``tkfac`` (Gao et al. 2020): ``F ≈ δ Φ⊗Ψ`` with ``δ = E[|a|²|g|²]``, ``Φ = E[|g|² a aᵀ]/δ``,
  ``Ψ = E[|a|² g gᵀ]/δ``, which keeps ``tr F``; used as K-FAC with ``A = √δ Φ``, ``G = √δ Ψ``.
- ``ekfac`` (George et al. 2018) / ``tekfac``: the eigenbases of the K-FAC / TKFAC factors and a
  per-entry running second moment ``s`` of the per-row gradients in that basis:
  ``ΔW = Q_G [(Q_Gᵀ ∇W Q_A) / (s + damping)] Q_Aᵀ``. When the basis is refreshed, ``s`` is carried
  into the new basis (``diag(Rᵀ diag(s) R)``, ``R = Q_oldᵀ Q_new``) rather than dropped.

Damping is relative (scale invariant): ``γ_A = damping · mean eig(A)``, ``γ_G = damping ·
mean eig(G)``; EKFAC's dense layers add K-FAC's damping of the two factors to ``s``,
``s + γ_G d_A + γ_A d_G + γ_G γ_A`` (``d_A, d_G`` the factors' eigenvalues), so that ``s = d_G ⊗
d_A`` gives damped K-FAC back (a damping of ``λ = damping · mean(s)`` alone let REC's directions
of small ``s`` beside a large factor eigenvalue take huge steps: validation spikes at damping
10–60; tables keep ``s + damping · mean(s)`` per row, see below). Factors are zero-initialised running averages with
decay ``factor_decay`` and bias correction ``1 - β^n``, updated every ``stats_freq`` steps
(kfac-pytorch's ``factor_update_steps``: between them no sampled-target pass runs and the
factors are used as they are; an embedding table's row frequencies come from the lookups
alone and are updated every step, TKFAC's with ``|g|²`` taken at its running mean ``δ``;
EKFAC's per-row second moments need every batch's gradients, so its kinds take only
``stats_freq=1``); eigenbases are refreshed every ``update_freq`` steps (fp64, symmetrised, jittered ``eigh``; on failure or non-finite factors
the previous basis is kept).

Embedding tables (one index per row of the lookup): the input factor is diagonal, ``A =
diag(f)`` with ``f_v`` the running frequency of row ``v`` (TKFAC: ``E[1{x=v}|g|²]/√δ``), so
row ``r`` is updated by ``(G + γ_G I + l2_r I)⁻¹ g_r / (ã_r + γ_A)``: state O(rows + d²),
cost O(touched rows · d²) per step, nothing densified. ``l2_r``: the model's L2 weight of the
row per visit (``model.curvature_l2()``, e.g. MF's frequency-scaled penalty), whose Hessian
``l2_r I`` per example is part of the row's curvature ``f_r (G + l2_r I)`` (TKFAC: in its
units, ``l2_r/√δ``; EKFAC: ``l2_r`` times the row's visits per touched step added to its
second moments); the gradient, and so the fixed point, is unchanged. Per-row statistics are
lazy: a row stores its running value and the step it was last touched; its decay over the
untouched steps is applied when it is next touched (exactly the dense running average).
Rare rows are not amplified by ``1/damping``: ``γ_A`` is relative to the mean frequency
(``1/rows``), and a per-row trust region, ``visit_gain`` (κ), bounds each row's step: one
visit moves the example's ``m`` predictions by about ``lr/B · tr(P_r G)/m`` times its
residual (``P_r`` the row's preconditioner, ``B`` the batch), and the row's ``c_r`` visits in
the batch may move them by at most κ (``P_r`` is scaled down where ``c_r`` times that gain
exceeds κ). ``row_floor`` (default 0) is the older bound: ``ã_r`` floored at ``row_floor ×``
the row's frequency in the current batch. With ``row_floor=0`` and ``visit_gain=None`` the
embedding path equals dense K-FAC on a one-hot ``nn.Linear`` (tested). EKFAC's ``s`` for a
table is per row and dimension (O(rows · d), like Adam) and is updated only for touched rows
(with a per-row bias correction), so it does not decay to zero for rare rows; it therefore
differs from a dense EKFAC on one-hot inputs, by design. For tables the ``Q_A`` basis is the
identity, so TEKFAC equals EKFAC there. Sparse embedding gradients (``sparse=True``) are
handled: coalesced, only the present rows rewritten, kept sparse.

The Fisher statistic's sampled-target pass asks autograd for the gradients at the hooked
modules' outputs (what the statistics record), not at their weights, which skips that pass's
weight-gradient kernels.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from recsys.optim.capture import LayerCapture

KINDS = ("kfac", "ekfac", "tkfac", "tekfac")
STATISTICS = ("fisher", "empirical")


def stable_eigh(matrix: torch.Tensor, previous: tuple[torch.Tensor, torch.Tensor] | None = None,
                jitter: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(eigenvalues >= 0, eigenvectors, ok)`` of a symmetric PSD factor, in fp64,
    symmetrised and jittered by ``jitter × mean diagonal``. When that fails (non-finite input,
    LinAlgError) returns ``previous`` (or the identity basis with the clamped diagonal) and
    ``ok=False``. Results are fresh tensors in ``matrix``'s dtype."""
    m = matrix.detach().double()
    m = 0.5 * (m + m.T)
    if bool(torch.isfinite(m).all()):
        scale = float(m.diagonal().abs().mean().clamp_min(1e-300))
        eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
        try:
            vals, vecs = torch.linalg.eigh(m + jitter * scale * eye)
            if bool(torch.isfinite(vals).all()) and bool(torch.isfinite(vecs).all()):
                vals = (vals - jitter * scale).clamp_min(0)
                return vals.to(matrix.dtype), vecs.to(matrix.dtype), True
        except RuntimeError:
            pass
    if previous is not None:
        return previous[0].clone(), previous[1].clone(), False
    diag = torch.nan_to_num(matrix.detach().diagonal(), nan=0.0, posinf=0.0).clamp_min(0)
    return diag.clone(), torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device), False


@dataclass(frozen=True)
class KFACConfig:
    """The K-FAC family's options when the trainer builds its preconditioner
    (`recsys.train.TrainConfig.kfac`; command line ``--damping``, ``--stats-freq``,
    ``--visit-gain``): ``damping`` relative to the factors' mean eigenvalue; update the
    curvature factors (and run the Fisher's sampled-target pass) every ``stats_freq`` steps;
    ``visit_gain``: the per-row trust region κ on embedding rows (None: no cap);
    ``update_freq``: refresh the dense layers' eigenbases every ``update_freq`` steps (REC's
    EKFAC reference: every step, whose per-entry second moments then stay in a current
    basis). See `KFACPreconditioner`."""

    damping: float = 1.0
    stats_freq: int = 1
    visit_gain: float | None = 0.1
    update_freq: int = 10

    def __post_init__(self) -> None:
        if not self.damping > 0:
            raise ValueError(f"damping must be > 0, got {self.damping}")
        if self.stats_freq < 1:
            raise ValueError(f"stats_freq must be >= 1, got {self.stats_freq}")
        if self.visit_gain is not None and not self.visit_gain > 0:
            raise ValueError(f"visit_gain must be > 0 or None (no cap), got {self.visit_gain}")
        if self.update_freq < 1:
            raise ValueError(f"update_freq must be >= 1, got {self.update_freq}")

    def check(self, kind: str) -> None:
        """ValueError when these options do not suit the preconditioner ``kind`` (EKFAC's
        kinds update their statistics every step)."""
        if self.stats_freq > 1 and kind in ("ekfac", "tekfac"):
            raise ValueError(f"{kind} updates its statistics every step: stats_freq must be 1, "
                             f"got {self.stats_freq}")


class KFACPreconditioner:
    """Kronecker-factored preconditioner (see the module docstring) over ``model``'s
    ``nn.Linear`` and ``nn.Embedding`` modules with trainable weights.

    Use: ``outputs, loss = model.loss_terms(u, i, r); pre.backward(outputs, loss); pre.step();
    optimizer.step()`` (with ``statistic="empirical"``, ``loss.backward()`` may replace
    `backward`). Follows ``torch.optim``
    conventions: ``param_groups`` (one group holding the hyperparameters, which may be changed
    between steps), ``step(closure)``, ``zero_grad``, ``state_dict`` / ``load_state_dict``
    (resumes bit-for-bit). `remove_hooks` detaches it from the model; `paused` suspends
    recording (extra forward/backward passes, e.g. SALR's).
    """

    def __init__(self, model: nn.Module, kind: str = "kfac", *, damping: float = 1.0,
                 factor_decay: float = 0.95, update_freq: int = 10, stats_freq: int = 1, row_floor: float = 0.0,
                 jitter: float = 1e-10, statistic: str = "fisher", seed: int = 0,
                 kl_clip: float | None = 1e-3, lr: float = 1.0, visit_gain: float | None = 0.1,
                 penalties: bool = True) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; choose one of {STATISTICS}")
        if damping < 0 or not 0 <= factor_decay < 1 or update_freq < 1 or stats_freq < 1 or row_floor < 0:
            raise ValueError("need damping >= 0, 0 <= factor_decay < 1, update_freq >= 1, stats_freq >= 1, "
                             "row_floor >= 0")
        if stats_freq > 1 and kind in ("ekfac", "tekfac"):
            raise ValueError(f"{kind} updates its per-row second moments from every batch's gradients: "
                             "it needs stats_freq=1")
        self.kind = kind
        self.statistic = statistic
        self.modules: dict[str, nn.Module] = {
            name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.requires_grad}
        params = [p for m in self.modules.values() for p in m.parameters(recurse=False) if p.requires_grad]
        if kl_clip is not None and kl_clip <= 0:
            raise ValueError(f"kl_clip must be > 0 or None, got {kl_clip}")
        if visit_gain is not None and visit_gain <= 0:
            raise ValueError(f"visit_gain must be > 0 or None, got {visit_gain}")
        self.defaults = dict(damping=damping, factor_decay=factor_decay, update_freq=update_freq, stats_freq=stats_freq,
                             row_floor=row_floor, jitter=jitter, kl_clip=kl_clip, lr=lr, visit_gain=visit_gain)
        #: the model's per-row L2 weights of its tables (``model.curvature_l2()``), added to
        #: the tables' curvature; ``penalties=False`` (or a model without it) leaves them out
        self._penalties = getattr(model, "curvature_l2", None) if penalties else None
        self.param_groups = [dict(params=params, **self.defaults)]
        self.state: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.modules}
        self.steps = 0
        self.capture = LayerCapture(self.modules.items())
        device = params[0].device if params else torch.device("cpu")
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._sampled = False  # whether the recorded pass carries sampled-target gradients
        self._examples: int | None = None  # examples (ratings) of the recorded pass, when known
        self.last_clip = 1.0  # the KL-clipping factor of the last step
        # Fisher statistic: the hooked modules' outputs of the pass being recorded, so that the
        # sampled-target pass stops at them (their weight gradients are not needed)
        self._outputs: list[torch.Tensor] = []
        self._keeping = True
        self._n_outputs = 1  # model outputs per example (the predictions a visit's gain is per)
        self._output_handles = [m.register_forward_hook(self._keep_output) for m in self.modules.values()] \
            if statistic == "fisher" else []
        #: per embedding table, the last step's rows and their eigenbasis scaling (see
        #: `precondition_rows`); not part of the state
        self.last_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._damped: dict[str, tuple] = {}  # per table, `_damped_eigenvalues`' cache

    def backward(self, outputs: torch.Tensor, loss: torch.Tensor, *, z: torch.Tensor | None = None) -> None:
        """Back-propagate ``loss`` into ``.grad`` and record the statistics: for the Fisher
        statistic, first sampled Gaussian targets through ``outputs [B, m]`` (into the
        statistics only), then the loss with the recorded gradients left alone. ``z [B, m]``:
        the target noise to use instead of drawing it (`draw_targets`; a leave-one-out retrain
        draws a whole batch's and drops the removed example's, so that the others keep theirs)."""
        self._examples = outputs.shape[0]
        self._n_outputs = outputs.shape[-1] if outputs.dim() > 1 else 1
        kept, self._outputs = self._outputs, []
        if self.statistic == "empirical" or not self.capture.active or not self.statistics_due:
            loss.backward()
            return
        if z is None:
            z = self.draw_targets(outputs.shape, outputs)
        # the gradients at the hooked modules' outputs are what the capture records; asking
        # for them rather than the weights' skips this extra pass's weight-gradient kernels
        targets = kept or [m.weight for m in self.modules.values()]
        torch.autograd.grad(outputs, targets, grad_outputs=z / outputs.shape[0], retain_graph=True,
                            allow_unused=True)
        with self.capture.grads_paused():
            loss.backward()
        self._sampled = True

    @property
    def statistics_due(self) -> bool:
        """Whether the next `step` updates the factors (every ``stats_freq``-th step, the first
        included), so that `backward` runs the sampled-target pass."""
        return self.steps % self.param_groups[0].get("stats_freq", 1) == 0

    def draw_targets(self, shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The Fisher statistic's target noise ``z ~ N(0, I)`` of ``shape``, from this
        preconditioner's generator (the next draw `backward` would make)."""
        return torch.randn(shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def _keep_output(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._keeping and module.training and torch.is_grad_enabled() and output.requires_grad:
            self._outputs.append(output)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward/backward passes inside do not feed the statistics."""
        old, self._keeping = self._keeping, False
        try:
            with self.capture.paused():
                yield
        finally:
            self._keeping = old

    def remove_hooks(self) -> None:
        self.capture.remove()
        for h in self._output_handles:
            h.remove()
        self._output_handles = []
        self._outputs = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def records_gathered(self, examples: int) -> None:
        """Data-parallel training replaced this step's records by every rank's (rank order):
        they now cover ``examples`` ratings, the global batch, not this rank's share, and carry
        the sampled-target gradients of the ranks that ran `backward` (a rank whose share of a
        small batch is empty has none of its own)."""
        self._examples = examples
        self._sampled = True

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Update the statistics from the recorded pass and precondition the gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stats = self.statistics_due
        if stats and self.statistic == "fisher" and not self._sampled and self.capture.active:
            raise RuntimeError("the Fisher statistic needs the sampled-target pass: call "
                               "pre.backward(outputs, loss) (outputs, loss = model.loss_terms(...)) instead "
                               "of loss.backward(), or build the preconditioner with statistic='empirical'")
        self._sampled = False
        self._outputs = []
        group = self.param_groups[0]
        self.steps += 1
        raw = {p: p.grad.clone() for m in self.modules.values() if isinstance(m, nn.Linear)
               for p in m.parameters(recurse=False) if p.grad is not None} if group["kl_clip"] else {}
        for name, module in self.modules.items():
            if module.weight.grad is None:
                self.capture.take(name)  # drop what this pass recorded
                continue
            if isinstance(module, nn.Embedding):
                examples = self.capture.take_embedding(name, module.embedding_dim, grads=stats)
                if examples is not None:
                    self._step_embedding(name, module, examples, group, stats)
            else:
                records = self.capture.take(name)
                if records and (stats or "QA" in self.state[name]):
                    self._step_linear(name, module, records if stats else None, group)
        self._examples = None
        if raw:
            self._clip(raw, group)
        return loss

    def _clip(self, raw: dict[torch.Tensor, torch.Tensor], group: dict) -> None:
        """KL clipping (Ba, Grosse & Martens 2017) of the dense layers: scale their
        preconditioned gradients by ``ν = min(1, sqrt(kl_clip / (lr² Σ ⟨Δ, g⟩)))``, so that the
        step's predicted change of the model's distribution stays bounded where the curvature
        is tiny (a layer whose outputs barely move the prediction, as REC's message layers
        early on). Embedding tables are not clipped: their rows are bounded by the row
        floor, and one step moves many rows, each by a Newton-like step of its own."""
        total = float(sum((p.grad * g).sum() for p, g in raw.items()))  # one device sync
        quadratic = group["lr"] ** 2 * abs(total)
        self.last_clip = 1.0 if quadratic <= group["kl_clip"] else (group["kl_clip"] / quadratic) ** 0.5
        if self.last_clip < 1.0:
            for p in raw:
                p.grad = p.grad * self.last_clip

    def _linear_rows(self, module: nn.Linear, records) -> tuple[torch.Tensor, torch.Tensor]:
        a_all, d_all = [], []
        for a, g in records:
            # per-example output gradients of a mean loss: times the number of examples (the
            # model's outputs when known: a layer may run on more rows, e.g. REC's messages)
            scale = self._examples or (a.shape[0] if a.dim() > 2 else a.reshape(-1, a.shape[-1]).shape[0])
            a2 = a.reshape(-1, a.shape[-1]).to(module.weight.dtype)
            if module.bias is not None:
                a2 = torch.cat([a2, a2.new_ones(a2.shape[0], 1)], 1)
            a_all.append(a2)
            d_all.append(g.reshape(-1, g.shape[-1]).to(module.weight.dtype) * scale)
        a, d = torch.cat(a_all), torch.cat(d_all)
        if self._examples and a.shape[0] != self._examples:
            # weight sharing (T = rows / examples rows per example, e.g. REC's messages at every
            # depth): F ≈ T·E[aaᵀ] ⊗ E[δδᵀ] over rows (KFC, Grosse & Martens 2016), folded into δ
            d = d * (a.shape[0] / self._examples) ** 0.5
        return a, d

    def _ema(self, st: dict, key: str, value: torch.Tensor, beta: float) -> None:
        if key not in st:
            st[key] = torch.zeros_like(value)
        st[key].mul_(beta).add_(value, alpha=1 - beta)

    def _step_linear(self, name: str, module: nn.Linear, records, group: dict) -> None:
        """Update the layer's factors from ``records`` (None: a step without statistics) and
        precondition its gradient."""
        st = self.state[name]
        beta, damping = group["factor_decay"], group["damping"]
        if records is not None:
            a, d = self._linear_rows(module, records)
            n = a.shape[0]
            if self.kind in ("tkfac", "tekfac"):
                na, nd = a.square().sum(1), d.square().sum(1)
                self._ema(st, "A", (a * nd[:, None]).T @ a / n, beta)
                self._ema(st, "G", (d * na[:, None]).T @ d / n, beta)
                self._ema(st, "delta", (na * nd).mean(), beta)
            else:
                self._ema(st, "A", a.T @ a / n, beta)
                self._ema(st, "G", d.T @ d / n, beta)
            st["n"] = st.get("n", torch.zeros((), dtype=torch.long)) + 1
        if "QA" not in st or (self.steps - 1) % group["update_freq"] == 0:
            self._refresh_linear(st, beta, group["jitter"])
        grad = module.weight.grad
        if module.bias is not None:
            grad = torch.cat([grad, module.bias.grad[:, None]], 1)
        v = st["QG"].T @ grad @ st["QA"]
        if self.kind in ("ekfac", "tekfac"):
            s_batch = (d @ st["QG"]).square().T @ (a @ st["QA"]).square() / n
            self._ema(st, "S", s_batch, beta)
            st["nS"] = st.get("nS", torch.zeros((), dtype=torch.long)) + 1
            s = st["S"] / (1 - beta ** int(st["nS"]))
            # K-FAC's damping of the two factors, (dG + γ_G)(dA + γ_A) − dG·dA, added to the
            # corrected eigenvalues s (s = dG ⊗ dA gives damped K-FAC back)
            da, dg = st["dA"], st["dG"]
            ga, gg = damping * da.mean(), damping * dg.mean()
            v = v / (s + gg * da[None, :] + ga * dg[:, None] + gg * ga)
        else:
            da, dg = st["dA"], st["dG"]
            v = v / ((dg + damping * dg.mean())[:, None] * (da + damping * da.mean())[None, :])
        new = st["QG"] @ v @ st["QA"].T
        if module.bias is not None:
            module.weight.grad.copy_(new[:, :-1])
            module.bias.grad.copy_(new[:, -1])
        else:
            module.weight.grad.copy_(new)

    def _effective(self, st: dict, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        corr = 1 - beta ** int(st["n"])
        a, g = st["A"] / corr, st["G"] / corr
        if "delta" in st:
            root = (st["delta"] / corr).clamp_min(1e-30).sqrt()
            a, g = a / root, g / root
        return a, g

    def _refresh_linear(self, st: dict, beta: float, jitter: float) -> None:
        a, g = self._effective(st, beta)
        old = (st.get("QA"), st.get("QG"))
        prev_a = (st["dA"], st["QA"]) if "QA" in st else None
        prev_g = (st["dG"], st["QG"]) if "QG" in st else None
        st["dA"], st["QA"], _ = stable_eigh(a, prev_a, jitter)
        st["dG"], st["QG"], _ = stable_eigh(g, prev_g, jitter)
        if "S" in st and old[0] is not None:
            ra, rg = (old[0].T @ st["QA"]).square(), (old[1].T @ st["QG"]).square()
            st["S"] = rg.T @ st["S"] @ ra

    def _step_embedding(self, name: str, module: nn.Embedding,
                        examples: tuple[torch.Tensor, torch.Tensor | None], group: dict, stats: bool = True) -> None:
        """Update the table's statistics from the batch's lookups ``examples`` (rows, output
        gradients; without ``stats`` only the rows, the gradients None) and precondition its gradient. A
        table first used on a step without statistics keeps its plain gradient until its first
        statistics step."""
        st = self.state[name]
        if not stats and "QG" not in st:
            return
        beta, damping, floor = group["factor_decay"], group["damping"], group["row_floor"]
        weight = module.weight
        n_rows, dim = weight.shape
        idx, d = examples
        if stats:
            d = d.to(weight.dtype)
        n = idx.numel()
        rows, inverse, counts = torch.unique(idx, return_inverse=True, return_counts=True)
        dev, dt = weight.device, weight.dtype
        if "row" not in st:
            st["row"] = torch.zeros(n_rows, dtype=dt, device=dev)
            st["row_last"] = torch.zeros(n_rows, dtype=torch.long, device=dev)
            st["row_sum"] = torch.zeros((), dtype=dt, device=dev)
            st["n"] = torch.zeros((), dtype=torch.long)
            st["G"] = torch.zeros(dim, dim, dtype=dt, device=dev)
        if "row_n" not in st:  # the rows' clock (a state saved before stats_freq: the factor count)
            st["row_n"] = st["n"].clone()
        trace_kind = self.kind in ("tkfac", "tekfac")
        eigen_kind = self.kind in ("ekfac", "tekfac")
        freq = counts.to(dt) / n  # the rows' visits per example of the batch
        if trace_kind and stats:
            nd = d.square().sum(1)
            u = torch.zeros(rows.numel(), dtype=dt, device=dev).index_add_(0, inverse, nd) / n
            self._ema(st, "delta", nd.mean(), beta)
        elif trace_kind:  # |g|² of this batch's visits not sampled: its running mean
            u = freq * (st["delta"] / (1 - beta ** int(st["n"])))
        else:
            u = freq
        if stats:
            st["G"].addmm_(d.T, d, beta=beta, alpha=(1 - beta) / n)
            st["n"] += 1
        st["row_n"] += 1
        step_n = int(st["row_n"])
        # lazy per-row running average: decay over the untouched steps, then add this batch
        gap = (step_n - st["row_last"][rows]).to(dt)
        row_new = st["row"][rows].mul_(torch.pow(beta, gap)).add_(u, alpha=1 - beta)
        st["row"][rows] = row_new
        st["row_last"][rows] = step_n
        st["row_sum"].mul_(beta).add_(u.sum(), alpha=1 - beta)
        corr = 1 - beta ** int(st["n"])  # the factor G's bias correction
        row_corr = 1 - beta ** step_n
        root = (st["delta"] / corr).clamp_min(1e-30).sqrt() if trace_kind else 1.0
        if "QG" not in st or (self.steps - 1) % group["update_freq"] == 0:
            old_q = st.get("QG")
            prev = (st["dG"], st["QG"]) if old_q is not None else None
            # the eigenvalues of G itself: TKFAC's 1/√δ is applied at use, with the current δ,
            # like the row factor's (a δ frozen at the refresh would mix two δ's in one row's
            # curvature, and TEKFAC's visit cap would then differ from EKFAC's)
            st["dG"], st["QG"], _ = stable_eigh(st["G"] / corr, prev, group["jitter"])
            if "S" in st and old_q is not None:
                st["S"] = st["S"] @ (old_q.T @ st["QG"]).square()
        grad = weight.grad
        sparse = grad.is_sparse
        lookups = grad._indices()[0] if sparse and not grad.is_coalesced() else None
        if lookups is not None and lookups.shape == idx.shape and torch.equal(lookups, idx):
            # one lookup per recorded row (the usual case): sum the lookups' gradients into the
            # batch's unique rows with the inverse already at hand, instead of coalescing
            g_rows = rows
            g_vals = torch.zeros(rows.numel(), dim, dtype=dt, device=dev).index_add_(0, inverse, grad._values())
        elif sparse:
            grad = grad.coalesce()
            g_rows, g_vals = grad.indices()[0], grad.values()
            if not torch.equal(g_rows, rows):  # rows present in the gradient but not recorded
                full = torch.zeros(n_rows, dim, dtype=dt, device=dev).index_add_(0, g_rows, g_vals)
                g_rows = torch.unique(torch.cat([g_rows, rows]))
                g_vals = full[g_rows]
        else:
            g_rows = rows
            g_vals = grad[rows]
        # the gradient's rows are the recorded ones (the usual case) or a superset of them
        same = g_rows.numel() == rows.numel()
        if not same:
            pos = torch.searchsorted(rows, g_rows).clamp_max(rows.numel() - 1)
            present = rows[pos] == g_rows
            freq = torch.where(present, freq[pos], 0.0)
        # the model's L2 penalty of these rows: its per-example Hessian is l2_r·I, so the
        # row's curvature is f_r (G + l2_r I) (TKFAC's units: l2_r / √δ)
        l2 = None
        if self._penalties is not None:
            table_l2 = self._penalties().get(name)
            if table_l2 is not None:
                l2 = table_l2.to(dev, dt)[g_rows]
        dg = st["dG"]
        if eigen_kind:
            if "S" not in st:
                st["S"] = torch.zeros(n_rows, dim, dtype=dt, device=dev)
                st["S_count"] = torch.zeros(n_rows, dtype=torch.long, device=dev)
            if "S_visits" not in st:  # a state saved before the penalty's curvature was tracked
                st["S_visits"] = torch.zeros(n_rows, dtype=dt, device=dev)
            s_batch = torch.zeros(rows.numel(), dim, dtype=dt, device=dev).index_add_(
                0, inverse, (d @ st["QG"]).square(), alpha=1 / n)
            s_new = st["S"][rows].mul_(beta).add_(s_batch, alpha=1 - beta)
            visits_new = st["S_visits"][rows].mul_(beta).add_(freq if same else counts.to(dt) / n, alpha=1 - beta)
            count_new = st["S_count"][rows] + 1
            st["S"][rows], st["S_visits"][rows], st["S_count"][rows] = s_new, visits_new, count_new
            if same:
                s, visits, count = s_new, visits_new, count_new
            else:
                s, visits, count = st["S"][g_rows], st["S_visits"][g_rows], st["S_count"][g_rows].clamp_min(1)
            count_corr = 1 - torch.pow(beta, count.to(dt))
            s = s / count_corr[:, None]
            if same:
                lam = damping * s.mean()
            else:
                lam = damping * s[present].mean() if bool(present.any()) else s.new_tensor(1.0)
            curvature = s.add_(lam)
            if l2 is not None:  # the penalty's curvature per touched step: visits / n · l2_r
                curvature = curvature.add_((visits / count_corr * l2)[:, None])
            scale = curvature.clamp_min_(1e-30).reciprocal_()
        else:
            inv = 1 / (row_corr * root)
            a_eff = row_new * inv if same else st["row"][g_rows] * inv
            if floor > 0:
                batch_floor = u * (floor / root)
                if not same:
                    batch_floor = torch.where(present, batch_floor[pos], 0.0)
                a_eff = torch.maximum(a_eff, batch_floor)
            a_eff = a_eff.add_(st["row_sum"] * (inv / n_rows), alpha=damping).clamp_min_(1e-30)
            g_base = self._damped_eigenvalues(name, dg, damping) / root
            curvature = g_base[None, :] if l2 is None else (l2 / root)[:, None] + g_base[None, :]
            scale = (curvature * a_eff[:, None]).reciprocal_()
        gain_cap = group.get("visit_gain")
        if gain_cap is not None:
            # one visit of row r moves each of the example's predictions by about
            # lr/B · tr(P_r G)/m times its residual (P_r this step's preconditioner of the row,
            # G the per-example curvature, m the predictions per example); c_r visits in the
            # batch: c_r times that, capped at visit_gain (a trust region per row)
            gain = (scale @ dg) * freq * (group["lr"] / self._n_outputs)
            scale = scale.mul_((gain_cap / gain.clamp_min_(gain_cap))[:, None])
        proj = (g_vals @ st["QG"]).mul_(scale)
        self.last_rows[name] = (g_rows, scale)
        new_vals = proj @ st["QG"].T
        if sparse:
            weight.grad = torch.sparse_coo_tensor(g_rows[None], new_vals, grad.shape, check_invariants=False,
                                                  is_coalesced=True)
        else:
            weight.grad[g_rows] = new_vals

    def _damped_eigenvalues(self, name: str, dg: torch.Tensor, damping: float) -> torch.Tensor:
        """``dG + damping · mean(dG)``, cached until the eigenbasis is refreshed."""
        cached = self._damped.get(name)
        if cached is None or cached[0] is not dg or cached[1] != damping:
            cached = (dg, damping, dg + damping * dg.mean())
            self._damped[name] = cached
        return cached[2]

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def precondition_rows(self, name: str, rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """The last step's preconditioner of embedding table ``name`` applied to ``vectors
        [n, dim]``, vector ``k`` as a gradient of row ``rows[k]``: the map `step` applied to
        that row, which is linear in the row's gradient, so that a batch's update of a row is
        the sum of its examples' preconditioned shares (gradient rollback credits each example
        its share, `recsys.explain.rollback`). Every row must have been in that step."""
        if name not in self.last_rows:
            raise KeyError(f"no step has preconditioned embedding table {name!r}")
        step_rows, scale = self.last_rows[name]
        pos = torch.searchsorted(step_rows, rows).clamp_max(step_rows.numel() - 1)
        if not bool((step_rows[pos] == rows).all()):
            raise ValueError(f"rows outside the last step of {name!r}")
        q = self.state[name]["QG"]
        return ((vectors.to(q.dtype) @ q) * scale[pos]) @ q.T

    def kronecker_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The current (bias-corrected, undamped) factors ``(A, G)`` of module ``name`` with
        ``F ≈ A ⊗ G`` (TKFAC: ``√δΦ, √δΨ``); for an embedding ``A`` is the vector of the
        diagonal (rows' values as of their last touch, decay not applied)."""
        st = self.state[name]
        beta = self.param_groups[0]["factor_decay"]
        corr = 1 - beta ** int(st["n"])
        root = (st["delta"] / corr).clamp_min(1e-30).sqrt() if "delta" in st else 1.0
        if "row" in st:
            row_corr = 1 - beta ** int(st.get("row_n", st["n"]))
            return st["row"] / row_corr / root, st["G"] / corr / root
        return self._effective(st, beta)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"kind": self.kind, "steps": self.steps, "param_groups": groups, "rng": self.generator.get_state(),
                "state": {name: {k: v.clone() for k, v in st.items()} for name, st in self.state.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["kind"] != self.kind:
            raise ValueError(f"state of a {state_dict['kind']!r} preconditioner, this is {self.kind!r}")
        if set(state_dict["state"]) != set(self.state):
            raise ValueError("the state's modules do not match this model's")
        self.steps = int(state_dict["steps"])
        if "rng" in state_dict:
            self.generator.set_state(state_dict["rng"])
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update(copy.deepcopy(saved))
        for name, st in state_dict["state"].items():
            device = self.modules[name].weight.device
            self.state[name] = {k: v.clone().to(device) if v.dim() else v.clone() for k, v in st.items()}
