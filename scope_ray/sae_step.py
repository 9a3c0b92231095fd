"""The BatchTopK SAE's training loss without dense B x F products where only K·B entries are non-zero.

``BatchTopKSAE.loss`` (scope_ray/sae.py) picks this path or the dense reference by size
(``use_sparse_step``; thresholds measured in bench/README.md). Both compute the same function:
the same loss, the same statistics updates and the same gradients to fp32 round-off
(tests/test_sae_step.py checks them against each other).

What the dense step spends its time on, and what this path does instead (E = the kept entries:
K·B of BatchTopK, plus B·k_aux of AuxK when latents are dead):

- the encoder GEMM x W_enc stays dense: every pre-activation is needed to select the K·B largest.
  It runs without autograd, so no B x F tensor is kept for the backward pass.
- decoder forward: an ``embedding_bag`` over the kept atoms (a token keeps a variable number of
  entries under BatchTopK: a bag per token), not z_BF W_dec.
- decoder backward: dL/dz only at the kept entries (``sampled_addmm``: E dot products of length
  D) and dL/dW_dec = zᵀ g as a sparse-dense product (rows of unused atoms stay 0).
- encoder backward: dL/dpre only at the kept entries (through the ReLU: where the value is > 0),
  so dL/dW_enc = x_cᵀ S is a dense-sparse product, dL/db_enc an index_add, and dL/db_dec (which
  enters through x_c = x − b_dec) is −W_enc · dL/db_enc, one matrix-vector product.

Entries are kept in CSR order (by output row, then atom); AuxK's entries are rows B..2B−1 of the
same sparse matrix, so one decoder call and one encoder call serve both terms.
No Ray import: plain PyTorch.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from scope_ray.sae import BatchTopKSAE, SAELoss

# CSR tensors are "beta" in PyTorch and warn once per process; the ops used here are stable ones.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

# Size thresholds (bench/README.md, "dense vs sparse step"): the sparse step wins once the dense
# B x F products are large and the kept fraction K/F is small. Below SPARSE_MIN_ENTRIES (B·F) the
# whole step takes a few milliseconds either way and the dense one has fewer kernel launches.
SPARSE_MIN_ENTRIES = 1 << 16
SPARSE_MAX_KEPT_FRACTION = 1 / 8


def use_sparse_step(n_tokens: int, d_sae: int, k: int, device: torch.device) -> bool:
    """Whether ``BatchTopKSAE.loss`` takes the sparse path for a batch of ``n_tokens`` tokens.

    CPU only for now: the GPU path has not been measured (bench/README.md)."""
    return (device.type == "cpu" and n_tokens * d_sae >= SPARSE_MIN_ENTRIES
            and k <= SPARSE_MAX_KEPT_FRACTION * d_sae)


def _csr(crow_R1: torch.Tensor, col_E: torch.Tensor, val_E: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow_R1, col_E, val_E, (n_rows, n_cols), check_invariants=False)


class _Pattern:
    """Where the E kept entries sit in the R x F sparse matrix S, in both orders: CSR by row (what
    the decoder's embedding_bag and sampled_addmm read) and CSR of Sᵀ, i.e. by atom (what the
    weight gradients, Sᵀ·(R x D), read)."""

    def __init__(self, row_E: torch.Tensor, col_E: torch.Tensor, n_rows: int, n_cols: int):
        # row_E must be sorted (entries come in CSR order).
        self.n_rows, self.n_cols, self.col = n_rows, n_cols, col_E
        self.crow = torch.zeros(n_rows + 1, dtype=torch.long, device=col_E.device)
        self.crow[1:] = torch.bincount(row_E, minlength=n_rows).cumsum(0)
        self.by_col = col_E.argsort(stable=True)
        self.ccrow = torch.zeros(n_cols + 1, dtype=torch.long, device=col_E.device)
        self.ccrow[1:] = torch.bincount(col_E, minlength=n_cols).cumsum(0)
        self.row_by_col = row_E[self.by_col]

    def transposed_times(self, val_E: torch.Tensor, dense_RD: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Sᵀ dense (F x D), written into ``out`` (every element: beta = 0). Writing into a buffer
        the caller made, in the layout the parameter has, saves the zero fill, the copy and the
        layout-fixing clone that ``Sᵀ @ dense`` and autograd would otherwise add (each an F x D pass)."""
        st = _csr(self.ccrow, self.row_by_col, val_E[self.by_col], self.n_cols, self.n_rows)
        return torch.addmm(out, st, dense_RD, beta=0.0, out=out)


class _KeptPre(torch.autograd.Function):
    """The kept pre-activations, pre[row_e, col_e] = ReLU(x_c W_enc + b_enc)[row_e, col_e], as a
    function of W_enc, b_enc and b_dec (x_c = x − b_dec). The values come in already computed by
    the dense no-grad GEMM (so they are bit-identical to the dense path's); the backward pass
    touches only these E entries."""

    @staticmethod
    def forward(ctx, val_E, xc_RD, W_enc_DF, b_enc_F, b_dec_D, pattern):
        # xc_RD = x − b_dec, already computed (without autograd) for the encoder GEMM; b_dec is
        # an input only so that its gradient has somewhere to go.
        ctx.save_for_backward(val_E, xc_RD, W_enc_DF)
        ctx.pattern = pattern
        return val_E.clone()

    @staticmethod
    def backward(ctx, grad_E):
        val_E, xc_RD, W_enc_DF = ctx.saved_tensors
        pattern = ctx.pattern
        d_in, d_sae = W_enc_DF.shape
        # ReLU's gradient is taken where its output is > 0, as torch's relu backward does.
        gpre_E = torch.where(val_E > 0, grad_E, 0.0)
        g_W = g_b_enc = g_b_dec = None
        if ctx.needs_input_grad[2]:
            # dL/dW_enc = x_cᵀ S = (Sᵀ x_c)ᵀ, S the R x F sparse matrix of dL/dpre, written
            # straight into W_enc's own layout (column-major: the tied init stores it as W_decᵀ).
            g_W = torch.empty_like(W_enc_DF)
            pattern.transposed_times(gpre_E, xc_RD, out=g_W.T)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            g_b_enc = torch.zeros(d_sae, dtype=grad_E.dtype, device=grad_E.device).index_add_(0, pattern.col, gpre_E)
            if ctx.needs_input_grad[4]:
                g_b_dec = -torch.mv(W_enc_DF, g_b_enc)
        return None, None, g_W, g_b_enc, g_b_dec, None


class _SparseDecode(torch.autograd.Function):
    """y_RD = S W_dec for the R x F sparse matrix S of the kept values: row r sums its kept atoms,
    each scaled by its value (an embedding_bag; rows may keep any number of atoms)."""

    @staticmethod
    def forward(ctx, val_E, W_dec_FD, pattern):
        ctx.save_for_backward(val_E, W_dec_FD)
        ctx.pattern = pattern
        return torch.nn.functional.embedding_bag(pattern.col, W_dec_FD, pattern.crow[:-1], mode="sum",
                                                 per_sample_weights=val_E)

    @staticmethod
    def backward(ctx, grad_RD):
        val_E, W_dec_FD = ctx.saved_tensors
        pattern = ctx.pattern
        grad_RD = grad_RD.contiguous()
        g_val = g_W = None
        if ctx.needs_input_grad[0]:
            # (g W_decᵀ) sampled at the kept entries only: E dot products of length D.
            where = _csr(pattern.crow, pattern.col, torch.zeros_like(val_E), pattern.n_rows, pattern.n_cols)
            g_val = torch.sparse.sampled_addmm(where, grad_RD, W_dec_FD.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            g_W = pattern.transposed_times(val_E, grad_RD, out=torch.empty_like(W_dec_FD))
        return g_val, g_W, None


def sparse_loss(sae: "BatchTopKSAE", x_BD: torch.Tensor, aux_coef: float) -> "SAELoss":
    """``BatchTopKSAE.loss`` computed sparsely (same arguments, same result; module docstring)."""
    from scope_ray.sae import SAELoss, _largest

    x_BD = x_BD.to(sae.W_enc.dtype)
    if x_BD.requires_grad:
        raise ValueError("the sparse SAE step does not differentiate with respect to the input")
    n_tok, d_sae = x_BD.shape[0], sae.d_sae
    dead_F = sae.dead_mask()  # as of before this batch
    s = sae.input_scale
    b_enc_F, b_dec_D, _ = sae._folded()
    with torch.no_grad():
        # Exactly pre_acts' operations (in place), so the selection is the dense path's.
        xc_BD = x_BD - b_dec_D
        pre_BF = (xc_BD @ sae.W_enc).add_(b_enc_F).relu_()
        n_keep = min(sae.k * n_tok, pre_BF.numel())
        kept_E, flat_E = _largest(pre_BF.flatten(), n_keep)
        flat_E, order = flat_E.sort()  # CSR order: by token, then atom
        kept_E = kept_E[order]
        row_E, col_E = flat_E // d_sae, flat_E % d_sae
        n_dead = int(dead_F.sum())
        if n_dead:
            # AuxK's entries: each token's top min(k_aux, #dead) pre-activations among dead latents.
            dead_idx = dead_F.nonzero().squeeze(1)
            aux_val_BA, j_BA = pre_BF[:, dead_idx].topk(min(sae.k_aux, n_dead), dim=1)
            aux_col_BA, o = dead_idx[j_BA].sort(dim=1)
            aux_val_BA = aux_val_BA.gather(1, o)
            n_aux = aux_col_BA.shape[1]
            aux_row = torch.arange(n_tok, 2 * n_tok, device=x_BD.device).repeat_interleave(n_aux)
            val_E = torch.cat([kept_E, aux_val_BA.flatten()])
            out_row_E = torch.cat([row_E, aux_row])
            col_all_E = torch.cat([col_E, aux_col_BA.flatten()])
        else:
            val_E, out_row_E, col_all_E = kept_E, row_E, col_E
        del pre_BF
        pattern = _Pattern(out_row_E, col_all_E, 2 * n_tok if n_dead else n_tok, d_sae)
        if sae.training:
            fired_F = torch.zeros(d_sae, dtype=torch.bool, device=x_BD.device)
            fired_F[col_E[kept_E > 0]] = True
            sae._record_statistics(fired_F, kept_E, n_tok)
    xc_RD = torch.cat([xc_BD, xc_BD]) if n_dead else xc_BD
    val_E = _KeptPre.apply(val_E, xc_RD, sae.W_enc, b_enc_F, b_dec_D, pattern)
    y_RD = _SparseDecode.apply(val_E, sae.W_dec, pattern)
    x_hat_BD = y_RD[:n_tok] + b_dec_D
    err_BD = (x_BD - x_hat_BD) * s
    mse = err_BD.pow(2).sum(dim=1).mean()
    if n_dead:
        e_hat_BD = y_RD[n_tok:] * s  # no b_dec: it models a residual
        aux = (err_BD.detach() - e_hat_BD).pow(2).sum(dim=1).mean()
    else:
        aux = x_BD.new_zeros(())
    with torch.no_grad():
        var = ((x_BD - x_BD.mean(dim=0)) * s).pow(2).sum()
        fvu = float(err_BD.pow(2).sum() / var)
        l0 = float((kept_E != 0).sum().double() / n_tok)
    return SAELoss(total=mse + aux_coef * aux, mse=mse, aux=aux, fvu=fvu, l0=l0,
                   dead_fraction=float(dead_F.double().mean()))




def adam(params, lr: float) -> torch.optim.Adam:
    """The SAE's optimizer: Adam, fused where PyTorch has the kernel (CPU and CUDA, torch ≥ 2.4).

    The for-loop Adam makes several passes over each F x D parameter per step; at F = 24,576 it
    took ~200 ms of a ~700 ms sparse CPU step, the fused kernel ~20 ms (bench/README.md). Same
    update rule: results differ by round-off only."""
    params = list(params)
    try:
        opt = torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype the fused kernel lacks
        return torch.optim.Adam(params, lr=lr)
    opt.register_load_state_dict_post_hook(_state_in_parameter_layout)
    return opt


def _state_in_parameter_layout(opt: torch.optim.Optimizer) -> None:
    # The fused kernel walks a parameter, its gradient and its moments in memory order, so they
    # must share one layout. W_enc is stored column-major (the tied init makes it W_decᵀ), but a
    # checkpoint's moments come back row-major: without this a resumed run silently paired
    # unrelated elements (tests/stages/test_train_sae.py's resume test caught it).
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    opt.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
