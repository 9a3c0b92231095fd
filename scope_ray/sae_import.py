"""SAEs trained by other toolkits, read exactly into one inference-only form (issue 17).

Every supported toolkit's SAE computes, at inference,

    r_BF = ReLU((x_BD − b_pre_D) @ W_enc_DF + b_enc_F)          (b_pre = 0 where the toolkit has none)
    z_BF = r                                    activation "relu"
         = per-row top-k of r                   activation "topk"
         = per-row top-k of the pre-activation, kept with its sign (no ReLU)   "topk_signed" (saev's TopK)
         = r · [r > θ]  or  r · [r ≥ θ]          activation "threshold" (θ a scalar or one per latent)
    x̂_BD = z @ W_dec_FD + b_dec_D

which is also this project's BatchTopKSAE at inference (a scalar θ, strict ">"). ``ImportedSAE``
holds that form; a reader per toolkit maps the toolkit's file onto it, applying at import what the
toolkit applies at inference (overcomplete's decoder normalisation and exp(multiplier), its
log-thresholds). docs/sae.md tables each toolkit's conventions and the mapping.

A toolkit whose data loader normalised the activations (saev: x' = (x − mean)·scale) trained its
SAE on x' and reconstructs x'; ``Source.input_normalization`` folds that map into the weights
(``fold_input_normalization``), so the imported SAE reads and reconstructs raw activations.

Files are read as safetensors, JSON or ``torch.load(weights_only=True)`` (plain tensors); a pickled
object is refused with the reason, never unpickled. What is read is checked: shapes against each
other, the activation's parameters present, values finite.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import safetensors.torch
import torch
from torch import nn

from scope_ray.storage import read_uri_bytes, write_uri_bytes

Activation = Literal["relu", "topk", "topk_signed", "threshold"]
Compare = Literal[">", ">="]
FORMAT = "scope-ray-imported-sae"
FORMAT_VERSION = 1
METADATA_KEY = "scope_ray_imported_sae"
TENSORS = ("W_enc", "b_enc", "W_dec", "b_pre", "b_dec", "threshold")


class SAEImportError(ValueError):
    """A file that cannot be imported, with what was found and what was expected."""


class ImportedSAE(nn.Module):
    """An SAE from another toolkit in the common inference form (module docstring).

    ``W_enc`` [D, F], ``b_enc`` [F], ``W_dec`` [F, D], ``b_pre`` [D], ``b_dec`` [D], ``threshold``
    [] or [F] (used by activation "threshold" only). ``provenance``: toolkit, architecture, the
    source file's name and sha256, anything the reader noted."""

    def __init__(self, W_enc_DF: torch.Tensor, b_enc_F: torch.Tensor, W_dec_FD: torch.Tensor, b_pre_D: torch.Tensor,
                 b_dec_D: torch.Tensor, *, activation: Activation, k: int | None = None,
                 threshold: torch.Tensor | None = None, compare: Compare = ">", provenance: dict | None = None):
        super().__init__()
        d, f = W_enc_DF.shape
        shapes = {"W_enc": (W_enc_DF, (d, f)), "b_enc": (b_enc_F, (f,)), "W_dec": (W_dec_FD, (f, d)),
                  "b_pre": (b_pre_D, (d,)), "b_dec": (b_dec_D, (d,))}
        wrong = {n: list(t.shape) for n, (t, s) in shapes.items() if tuple(t.shape) != s}
        if wrong:
            raise SAEImportError(f"tensor shapes do not fit one SAE of width {d} and {f} latents: {wrong}")
        if activation not in ("relu", "topk", "topk_signed", "threshold"):
            raise SAEImportError(f"activation {activation!r}; allowed: relu, topk, topk_signed, threshold")
        if activation in ("topk", "topk_signed") and not (k is not None and 1 <= k <= f):
            raise SAEImportError(f"a top-k SAE needs 1 <= k <= {f}; got k={k}")
        if activation == "threshold":
            if threshold is None or threshold.shape not in ((), (f,)):
                raise SAEImportError(f"a threshold SAE needs a threshold of shape [] or [{f}]; got "
                                   f"{None if threshold is None else list(threshold.shape)}")
            if compare not in (">", ">="):
                raise SAEImportError(f"threshold comparison {compare!r}; allowed: >, >=")
        tensors = {"W_enc": W_enc_DF, "b_enc": b_enc_F, "W_dec": W_dec_FD, "b_pre": b_pre_D, "b_dec": b_dec_D}
        if threshold is not None:
            tensors["threshold"] = threshold
        bad = [n for n, t in tensors.items() if not torch.isfinite(t.float()).all()]
        if bad:
            raise SAEImportError(f"non-finite values in {bad}")
        dtype = W_enc_DF.dtype
        for name, t in tensors.items():
            self.register_buffer(name, t.detach().to(dtype).clone().contiguous())
        if threshold is None:
            self.register_buffer("threshold", torch.zeros((), dtype=dtype))
        self.d_in, self.d_sae = d, f
        self.activation, self.k, self.compare = activation, k, compare
        self.provenance = dict(provenance or {})

    # --- the model ----------------------------------------------------------------------------
    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.relu((x_BD.to(self.W_enc.dtype) - self.b_pre) @ self.W_enc + self.b_enc)

    def encode(self, x_BD: torch.Tensor, use_threshold: bool = True) -> torch.Tensor:
        """z_BF as the source toolkit computes it at inference (``use_threshold`` is accepted for
        the stages' calling convention; an imported SAE has one inference rule)."""
        if self.activation == "topk_signed":
            h_BF = (x_BD.to(self.W_enc.dtype) - self.b_pre) @ self.W_enc + self.b_enc
            index = h_BF.topk(self.k, dim=-1).indices
            return torch.zeros_like(h_BF).scatter_(-1, index, h_BF.gather(-1, index))
        r_BF = self.pre_acts(x_BD)
        if self.activation == "relu":
            return r_BF
        if self.activation == "topk":
            values, index = r_BF.topk(self.k, dim=-1)
            return torch.zeros_like(r_BF).scatter_(-1, index, values)
        keep = r_BF > self.threshold if self.compare == ">" else r_BF >= self.threshold
        return r_BF * keep

    def decode(self, z_BF: torch.Tensor) -> torch.Tensor:
        return z_BF.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_BF = self.encode(x_BD)
        return self.decode(z_BF), z_BF

    def config(self) -> dict:
        return {"d_in": self.d_in, "d_sae": self.d_sae, "activation": self.activation, "k": self.k,
                "compare": self.compare, "threshold_shape": list(self.threshold.shape)}

    # --- files --------------------------------------------------------------------------------
    def save(self, path: str | Path, *, endpoint_url: str | None = None) -> None:
        """One safetensors file: the tensors and a JSON header (config and provenance)."""
        tensors = {n: getattr(self, n).detach().cpu().contiguous() for n in TENSORS}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.config(), "provenance": self.provenance}
        blob = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(meta)})
        write_uri_bytes(str(path), blob, endpoint_url)

    @classmethod
    def load(cls, path: str | Path, *, endpoint_url: str | None = None,
             device: str | torch.device = "cpu") -> "ImportedSAE":
        blob = read_uri_bytes(str(path), endpoint_url, "imported SAE")
        meta = safetensors_metadata(blob, str(path)).get(METADATA_KEY)
        if meta is None:
            raise SAEImportError(f"{path} is not an imported-SAE file (no {METADATA_KEY!r} header)")
        config = json.loads(meta)
        if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
            raise SAEImportError(f"{path}: format {config.get('format')!r} v{config.get('format_version')!r}; "
                               f"expected {FORMAT!r} v{FORMAT_VERSION}")
        t = safetensors.torch.load(blob)
        threshold = t["threshold"] if config["activation"] == "threshold" else None
        sae = cls(t["W_enc"], t["b_enc"], t["W_dec"], t["b_pre"], t["b_dec"], activation=config["activation"],
                  k=config["k"], threshold=threshold, compare=config["compare"], provenance=config["provenance"])
        return sae.to(device).eval()


def safetensors_metadata(blob: bytes, where: str) -> dict:
    """The string metadata of a safetensors file's header ({} when it has none)."""
    try:
        n = int.from_bytes(blob[:8], "little")
        return json.loads(blob[8:8 + n]).get("__metadata__") or {}
    except Exception as exc:  # noqa: BLE001 - any parse failure: not safetensors
        raise SAEImportError(f"{where} is not a safetensors file ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------------------------------------- reading files
def _read_bytes(path: str, endpoint_url: str | None) -> bytes:
    try:
        return read_uri_bytes(path, endpoint_url, "SAE file")
    except FileNotFoundError as exc:
        raise SAEImportError(str(exc)) from None


def _tensors(path: str, endpoint_url: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a safetensors or torch.save file, and its sha256. A torch.save file that
    holds more than tensors (a pickled module, an optimizer) is refused: never unpickled."""
    blob = _read_bytes(path, endpoint_url)
    digest = hashlib.sha256(blob).hexdigest()
    if path.endswith(".safetensors"):
        try:
            return safetensors.torch.load(blob), digest
        except Exception as exc:  # noqa: BLE001
            raise SAEImportError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    import io

    try:
        loaded = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - weights_only refuses anything but tensors and containers
        raise SAEImportError(f"{path}: not a plain state dict of tensors, so it is not loaded (it would need "
                           f"unpickling arbitrary objects: {type(exc).__name__}: {str(exc).splitlines()[0]}). "
                           "Save the model's state_dict() instead") from None
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise SAEImportError(f"{path}: expected a dict of tensors (a state_dict), got {type(loaded).__name__}")
    return loaded, digest


def _require(sd: dict, keys: tuple[str, ...], where: str, what: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise SAEImportError(f"{where}: not a {what} file: tensors {missing} missing (found {sorted(sd)})")


def _json(path: str, endpoint_url: str | None) -> dict:
    try:
        return json.loads(_read_bytes(path, endpoint_url))
    except json.JSONDecodeError as exc:
        raise SAEImportError(f"{path}: not JSON ({exc})") from None


@dataclass(frozen=True)
class InputNormalization:
    """The toolkit's loader computed x' = (x − mean)·scale before the SAE; ``mean`` is a
    safetensors file holding one tensor [D] (None: nothing subtracted)."""

    scale: float = 1.0
    mean: str | None = None


@dataclass(frozen=True)
class Source:
    """Where an SAE comes from: the toolkit's format, its file (or folder), and options the file
    does not hold (overcomplete saves no config)."""

    format: str
    path: str
    architecture: str | None = None
    k: int | None = None
    threshold: float | None = None
    input_normalization: InputNormalization | None = None


def _provenance(fmt: str, architecture: str, path: str, digest: str, **extra) -> dict:
    return {"toolkit": fmt, "architecture": architecture, "source": path, "sha256": digest, **extra}


def read_sparsify(src: Source, endpoint_url: str | None = None) -> ImportedSAE:
    """EleutherAI sparsify: a folder with ``sae.safetensors`` (encoder.weight [F, D], encoder.bias,
    W_dec [F, D], b_dec) and ``cfg.json`` (k, activation, transcode, skip_connection)."""
    folder = src.path.rstrip("/")
    sd, digest = _tensors(posixpath.join(folder, "sae.safetensors"), endpoint_url)
    cfg = _json(posixpath.join(folder, "cfg.json"), endpoint_url)
    _require(sd, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), folder, "sparsify SparseCoder")
    if cfg.get("activation", "topk") != "topk":
        raise SAEImportError(f"{folder}: sparsify activation {cfg.get('activation')!r}; supported: topk")
    if cfg.get("skip_connection") or "W_skip" in sd:
        raise SAEImportError(f"{folder}: a skip connection (W_skip) is not part of an SAE's dictionary; not supported")
    b_dec = sd["b_dec"]
    b_pre = torch.zeros_like(b_dec) if cfg.get("transcode") else b_dec
    return ImportedSAE(sd["encoder.weight"].T, sd["encoder.bias"], sd["W_dec"], b_pre, b_dec, activation="topk",
                       k=int(cfg["k"]), provenance=_provenance("sparsify", "topk", folder, digest,
                                                               transcode=bool(cfg.get("transcode"))))


_DL_CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder")


def read_dictionary_learning(src: Source, endpoint_url: str | None = None) -> ImportedSAE:
    """saprmarks/dictionary_learning: ``ae.pt`` (a state dict) with ``config.json`` beside it
    (``trainer.dict_class``); ``src.architecture`` names the class when there is no config."""
    path = src.path
    folder = posixpath.dirname(path) if path.endswith(".pt") else path.rstrip("/")
    path = path if path.endswith(".pt") else posixpath.join(folder, "ae.pt")
    sd, digest = _tensors(path, endpoint_url)
    cls = src.architecture
    if cls is None:
        config_path = posixpath.join(folder, "config.json")
        cls = _json(config_path, endpoint_url).get("trainer", {}).get("dict_class")
    if cls not in _DL_CLASSES:
        raise SAEImportError(f"{path}: dictionary_learning class {cls!r}; supported: {', '.join(_DL_CLASSES)}")
    prov = _provenance("dictionary_learning", cls, path, digest)
    if cls == "AutoEncoder":
        _require(sd, ("bias", "encoder.weight", "encoder.bias", "decoder.weight"), path, cls)
        return ImportedSAE(sd["encoder.weight"].T, sd["encoder.bias"], sd["decoder.weight"].T, sd["bias"], sd["bias"],
                           activation="relu", provenance=prov)
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        _require(sd, ("b_dec", "k", "threshold", "encoder.weight", "encoder.bias", "decoder.weight"), path, cls)
        W_enc, b_enc, W_dec, b = sd["encoder.weight"].T, sd["encoder.bias"], sd["decoder.weight"].T, sd["b_dec"]
    else:
        keys = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold") + (("k",) if cls.startswith("Matryoshka") else ())
        _require(sd, keys, path, cls)
        W_enc, b_enc, W_dec, b = sd["W_enc"], sd["b_enc"], sd["W_dec"], sd["b_dec"]
    if cls == "AutoEncoderTopK":  # its forward keeps the per-row top k (the threshold is training-only)
        return ImportedSAE(W_enc, b_enc, W_dec, b, b, activation="topk", k=int(sd["k"]), provenance=prov)
    threshold = sd["threshold"]
    if cls == "JumpReluAutoEncoder":  # no pre-encoder bias; per-latent raw thresholds
        return ImportedSAE(W_enc, b_enc, W_dec, torch.zeros_like(b), b, activation="threshold", threshold=threshold,
                           compare=">", provenance=prov)
    if float(threshold) < 0:
        raise SAEImportError(f"{path}: {cls} threshold {float(threshold)} was never estimated (training stopped "
                           "before threshold_start_step): its inference would be a plain ReLU SAE, not BatchTopK")
    return ImportedSAE(W_enc, b_enc, W_dec, b, b, activation="threshold", threshold=threshold, compare=">",
                       k=int(sd["k"]), provenance=prov)


_OC_ARCHITECTURES = ("SAE", "TopKSAE", "BatchTopKSAE", "JumpSAE")


def read_overcomplete(src: Source, endpoint_url: str | None = None) -> ImportedSAE:
    """KempnerInstitute/overcomplete: a ``state_dict()`` saved with torch.save or safetensors (the
    toolkit saves no config: ``architecture`` and, for TopKSAE ``k``, for BatchTopKSAE its running
    ``threshold`` (not in the state dict), come from the caller). The decoder is the dictionary as
    the toolkit uses it at inference: rows L2-normalised (+1e-8), times exp(multiplier); JumpSAE's
    thresholds are exp of the stored log-thresholds; its comparisons are >=."""
    arch = src.architecture
    if arch not in _OC_ARCHITECTURES:
        raise SAEImportError(f"overcomplete needs --architecture (the toolkit saves no config); got {arch!r}; "
                           f"allowed: {', '.join(_OC_ARCHITECTURES)}")
    sd, digest = _tensors(src.path, endpoint_url)
    keys = ("encoder.final_block.0.weight", "encoder.final_block.0.bias", "dictionary._weights")
    _require(sd, keys + (("thresholds",) if arch == "JumpSAE" else ()), src.path, f"overcomplete {arch}")
    W = sd["dictionary._weights"]
    multiplier = sd.get("dictionary.multiplier", torch.zeros((), dtype=W.dtype))
    W_dec = W / (W.norm(dim=1, keepdim=True) + 1e-8) * torch.exp(multiplier)
    W_enc, b_enc = sd["encoder.final_block.0.weight"].T, sd["encoder.final_block.0.bias"]
    zeros = torch.zeros(W_enc.shape[0], dtype=W.dtype)
    prov = _provenance("overcomplete", arch, src.path, digest)
    if arch == "SAE":
        return ImportedSAE(W_enc, b_enc, W_dec, zeros, zeros, activation="relu", provenance=prov)
    if arch == "TopKSAE":
        if src.k is None:
            raise SAEImportError(f"{src.path}: an overcomplete TopKSAE needs k (its top_k is not saved)")
        return ImportedSAE(W_enc, b_enc, W_dec, zeros, zeros, activation="topk", k=src.k, provenance=prov)
    if arch == "BatchTopKSAE":
        if src.threshold is None:
            raise SAEImportError(f"{src.path}: an overcomplete BatchTopKSAE needs its running threshold (the model's "
                               "running_threshold attribute, which state_dict() does not save)")
        return ImportedSAE(W_enc, b_enc, W_dec, zeros, zeros, activation="threshold", compare=">=",
                           threshold=torch.tensor(float(src.threshold), dtype=W.dtype), provenance=prov)
    return ImportedSAE(W_enc, b_enc, W_dec, zeros, zeros, activation="threshold", compare=">=",
                       threshold=torch.exp(sd["thresholds"]), provenance=prov)


def read_plain(src: Source, endpoint_url: str | None = None) -> ImportedSAE:
    """The documented layout for anything else (docs/sae.md): a safetensors file with W_enc [D, F],
    b_enc [F], W_dec [F, D], b_dec [D], optional b_pre [D] (default zeros) and threshold ([] or [F]),
    and string metadata ``activation`` (relu / topk / threshold), ``k``, ``compare`` (> or >=)."""
    if not src.path.endswith(".safetensors"):
        raise SAEImportError(f"{src.path}: the plain layout is a .safetensors file")
    blob = _read_bytes(src.path, endpoint_url)
    meta = safetensors_metadata(blob, src.path)
    sd = safetensors.torch.load(blob)
    _require(sd, ("W_enc", "b_enc", "W_dec", "b_dec"), src.path, "plain-layout SAE")
    activation = meta.get("activation")
    if activation is None:
        raise SAEImportError(f"{src.path}: header metadata lacks 'activation' (relu, topk or threshold)")
    k = int(meta["k"]) if meta.get("k") not in (None, "", "null") else None
    return ImportedSAE(sd["W_enc"], sd["b_enc"], sd["W_dec"], sd.get("b_pre", torch.zeros_like(sd["b_dec"])),
                       sd["b_dec"], activation=activation, k=k, threshold=sd.get("threshold"),
                       compare=meta.get("compare", ">"),
                       provenance=_provenance("plain", activation, src.path, hashlib.sha256(blob).hexdigest()))


_SAELENS_IDENTITY_NORMS = ("none", "expected_average_only_in", "covariance_whitening")


def read_saelens(src: Source, endpoint_url: str | None = None) -> ImportedSAE:
    """SAELens (5.x and 6.x): a folder with ``sae_weights.safetensors`` (W_enc [D, F], b_enc, W_dec
    [F, D], b_dec; jumprelu's ``threshold`` or ``log_threshold``) and ``cfg.json``. Folded at import
    exactly as SAELens computes: ``rescale_acts_by_decoder_norm`` (pre-activations times the decoder
    row norms, codes divided by them before decoding) and 5.x's ``scaling_factor`` (codes times it
    before decoding) go into the weights; ``expected_average_only_in`` and whitening are already
    folded by SAELens at the end of training (identity at inference)."""
    folder = src.path.rstrip("/")
    sd, digest = _tensors(posixpath.join(folder, "sae_weights.safetensors"), endpoint_url)
    cfg = _json(posixpath.join(folder, "cfg.json"), endpoint_url)
    arch = cfg.get("architecture") or "standard"
    if cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk" and arch == "standard":
        arch, cfg = "topk", {**cfg, "k": (cfg.get("activation_fn_kwargs") or {}).get("k")}  # 5.x spelling
    if "topk_threshold" in sd:  # a BatchTopK training checkpoint: SAELens saves it as jumprelu
        arch = "batchtopk-checkpoint"
    norm = cfg.get("normalize_activations", "none")
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    if norm not in _SAELENS_IDENTITY_NORMS:
        raise SAEImportError(f"{folder}: normalize_activations {norm!r} rescales each input inside the SAE; not "
                             f"supported (supported: {', '.join(_SAELENS_IDENTITY_NORMS)})")
    if arch not in ("standard", "topk", "jumprelu", "batchtopk-checkpoint"):
        raise SAEImportError(f"{folder}: SAELens architecture {arch!r}; supported: standard, topk, jumprelu")
    _require(sd, ("W_enc", "b_enc", "W_dec", "b_dec"), folder, f"SAELens {arch}")
    W_enc, b_enc, W_dec, b_dec = sd["W_enc"], sd["b_enc"], sd["W_dec"], sd["b_dec"]
    if "scaling_factor" in sd:
        W_dec = W_dec * sd["scaling_factor"][:, None]
    if arch in ("topk", "batchtopk-checkpoint") and cfg.get("rescale_acts_by_decoder_norm"):
        n_F = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * n_F, b_enc * n_F, W_dec / n_F[:, None]
    b_pre = b_dec if cfg.get("apply_b_dec_to_input", True) else torch.zeros_like(b_dec)
    prov = _provenance("saelens", arch, folder, digest, sae_lens_version=(cfg.get("metadata") or {}).get(
        "sae_lens_version", cfg.get("sae_lens_training_version")))
    if arch == "standard":
        return ImportedSAE(W_enc, b_enc, W_dec, b_pre, b_dec, activation="relu", provenance=prov)
    if arch == "topk":
        return ImportedSAE(W_enc, b_enc, W_dec, b_pre, b_dec, activation="topk", k=int(cfg["k"]), provenance=prov)
    if arch == "batchtopk-checkpoint":
        threshold = torch.full_like(b_enc, float(sd["topk_threshold"]))
    elif "threshold" in sd:
        threshold = sd["threshold"]
    elif "log_threshold" in sd:
        threshold = torch.exp(sd["log_threshold"])
    else:
        raise SAEImportError(f"{folder}: a jumprelu SAE without threshold or log_threshold (found {sorted(sd)})")
    return ImportedSAE(W_enc, b_enc, W_dec, b_pre, b_dec, activation="threshold", threshold=threshold, compare=">",
                       provenance=prov)


def read_saev(src: Source, endpoint_url: str | None = None) -> ImportedSAE:
    """saev (OSU-NLP-Group): one file, a JSON header line then a torch.save'd state dict (read with
    weights_only=True). Its two generations compute differently and are followed as written:
    no ``schema`` (PyPI 0.1.0): ReLU of (x − b_dec) W_enc + b_enc; schema >= 1: no b_dec subtraction,
    ReLU, TopK without a ReLU (signed codes), or BatchTopK's scalar threshold (``activation.threshold``;
    <= 0 means ReLU). saev normalised inputs in its data loader, not in the file (0.1.0's
    ``saev/activations.py`` ``Dataset.transform``, defaults ``scale_mean`` / ``scale_norm`` on:
    (x − act_mean) / scalar, scalar = mean ‖x − act_mean‖ / sqrt(d)); give those as
    ``Source.input_normalization`` (scale = 1 / scalar, mean = act_mean) to fold them in, else feed the
    SAE activations prepared that way."""
    import io

    blob = _read_bytes(src.path, endpoint_url)
    digest = hashlib.sha256(blob).hexdigest()
    head, _, rest = blob.partition(b"\n")
    try:
        header = json.loads(head)
    except json.JSONDecodeError:
        raise SAEImportError(f"{src.path}: not a saev file (its first line is not a JSON header)") from None
    try:
        sd = torch.load(io.BytesIO(rest), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise SAEImportError(f"{src.path}: the state dict after the header does not load as plain tensors "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    _require(sd, ("W_enc", "b_enc", "W_dec", "b_dec"), src.path, "saev")
    W_enc, b_enc, W_dec, b_dec = sd["W_enc"], sd["b_enc"], sd["W_dec"], sd["b_dec"]
    schema = header.get("schema")
    if schema is None:
        return ImportedSAE(W_enc, b_enc, W_dec, b_dec, b_dec, activation="relu",
                           provenance=_provenance("saev", "relu (0.1.0)", src.path, digest))
    cfg = header.get("cfg", {})
    act = cfg.get("activation") if isinstance(cfg.get("activation"), dict) else {"cls": header.get("cls", "Relu")}
    cls, params = act.get("cls", "Relu"), act.get("params", {})
    zeros = torch.zeros_like(b_dec)
    prov = _provenance("saev", f"{cls} (schema {schema})", src.path, digest)
    if cls == "Relu":
        return ImportedSAE(W_enc, b_enc, W_dec, zeros, b_dec, activation="relu", provenance=prov)
    if cls == "TopK":
        k = min(int(params.get("top_k", cfg.get("top_k", 0))), W_enc.shape[1])
        return ImportedSAE(W_enc, b_enc, W_dec, zeros, b_dec, activation="topk_signed", k=k, provenance=prov)
    if cls == "BatchTopK":
        if "activation.threshold" not in sd:
            raise SAEImportError(f"{src.path}: a saev BatchTopK SAE without its threshold (schema {schema} < 4 saves "
                                 "none): its inference rule is not in the file")
        theta = torch.clamp(sd["activation.threshold"].float(), min=0.0).to(W_enc.dtype)  # <= 0: ReLU
        return ImportedSAE(W_enc, b_enc, W_dec, zeros, b_dec, activation="threshold", threshold=theta, compare=">",
                           provenance=prov)
    raise SAEImportError(f"{src.path}: saev activation {cls!r}; supported: Relu, TopK, BatchTopK")


READERS: dict[str, Callable[[Source, str | None], ImportedSAE]] = {
    "sparsify": read_sparsify, "dictionary_learning": read_dictionary_learning, "overcomplete": read_overcomplete,
    "saelens": read_saelens, "saev": read_saev, "plain": read_plain,
}


def import_sae(src: Source, endpoint_url: str | None = None) -> ImportedSAE:
    """``src`` read by its format's reader (its input normalisation folded in), in eval mode."""
    if src.format not in READERS:
        raise SAEImportError(f"unknown SAE format {src.format!r}; allowed: {', '.join(READERS)}")
    sae = READERS[src.format](src, endpoint_url)
    if src.input_normalization is not None:
        sae = fold_input_normalization(sae, src.input_normalization, endpoint_url)
    return sae.eval()


def _input_mean(norm: InputNormalization, d: int, endpoint_url: str | None) -> tuple[torch.Tensor, str | None]:
    """The loader's mean m_D (zeros when none) and its file's sha256."""
    if norm.mean is None:
        return torch.zeros(d, dtype=torch.float64), None
    sd, digest = _tensors(norm.mean, endpoint_url)
    found = {n: list(t.shape) for n, t in sd.items()}
    if len(sd) != 1 or list(next(iter(sd.values())).shape) != [d]:
        raise SAEImportError(f"input mean {norm.mean}: expected one tensor of shape [{d}] (the SAE's width); "
                             f"found {found}")
    m_D = next(iter(sd.values())).double()
    if not torch.isfinite(m_D).all():
        raise SAEImportError(f"input mean {norm.mean}: non-finite values in {next(iter(sd))} {found}")
    return m_D, digest


def fold_input_normalization(sae: ImportedSAE, norm: InputNormalization,
                             endpoint_url: str | None = None) -> ImportedSAE:
    """The SAE on raw x, for a toolkit that fed it x' = (x − m)·s and reconstructs x' (raw = x̂'/s + m).
    (x' − b_pre) W_enc = (x − (m + b_pre/s)) (s·W_enc): every activation sees the same pre-activation,
    so codes and thresholds are unchanged; x̂'/s + m = z (W_dec/s) + (b_dec/s + m). In float64, then
    the weights' dtype, so the fold adds one rounding per weight; at least float32, because b_pre now
    carries the mean and x − b_pre in half precision would cancel where the toolkit subtracted in fp32."""
    s = float(norm.scale)
    if not (s > 0 and s < float("inf")):
        raise SAEImportError(f"input scale {norm.scale!r}: must be a finite number > 0")
    m_D, digest = _input_mean(norm, sae.d_in, endpoint_url)
    dtype = torch.promote_types(sae.W_enc.dtype, torch.float32)
    W_enc_DF, b_pre_D = sae.W_enc.double() * s, m_D + sae.b_pre.double() / s
    W_dec_FD, b_dec_D = sae.W_dec.double() / s, sae.b_dec.double() / s + m_D
    prov = {**sae.provenance, "input_normalization": {"scale": s, "mean": norm.mean, "mean_sha256": digest}}
    return ImportedSAE(W_enc_DF.to(dtype), sae.b_enc.to(dtype), W_dec_FD.to(dtype), b_pre_D.to(dtype), b_dec_D.to(dtype),
                       activation=sae.activation, k=sae.k,
                       threshold=sae.threshold.to(dtype) if sae.activation == "threshold" else None,
                       compare=sae.compare, provenance=prov)
