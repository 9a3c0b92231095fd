"""scope_ray/sae_import.py: each toolkit's file, built to the layout its code writes (shapes and
names from the toolkit's source, docs/sae.md), reads back into the forward that toolkit computes.

The expected codes and reconstructions are written here from each toolkit's published inference
rule, term by term (per-row top-k after the ReLU, strict or non-strict thresholds, the toolkit's
own decoder normalisation), independently of ``ImportedSAE``. bench/check_sae_import.py checks
the same readers against the toolkits' own code and files (it needs their pinned environment).
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from scope_ray.sae import BatchTopKSAE
from scope_ray.sae_import import ImportedSAE, InputNormalization, SAEImportError, Source, import_sae

D, F, K = 6, 20, 3


@pytest.fixture
def x():
    return torch.randn(33, D, generator=torch.Generator().manual_seed(1)) * 2 + 0.2


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _topk_rows(r, k):
    out = torch.zeros_like(r)
    for i, row in enumerate(r):
        order = sorted(range(row.numel()), key=lambda j: -float(row[j]))[:k]
        out[i, order] = row[order]
    return out


def _assert_forward(sae: ImportedSAE, x, codes, recon):
    got_recon, got_codes = sae(x)
    # fp32: the same sums in another order differ by rounding (~1e-7 of the value), nothing more.
    torch.testing.assert_close(got_codes, codes, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got_recon, recon, atol=1e-5, rtol=1e-6)


def test_sparsify_folder_is_a_per_row_topk_after_relu_on_x_minus_b_dec(tmp_path, x):
    enc_w, enc_b, W_dec, b_dec = _rand(F, D, seed=2), _rand(F, seed=3), _rand(F, D, seed=4), _rand(D, seed=5)
    folder = tmp_path / "layers.3"
    folder.mkdir()
    safetensors.torch.save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
                                str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "k": K, "num_latents": F, "d_in": D,
                                                 "transcode": False, "skip_connection": False}))
    r = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    z = _topk_rows(r, K)
    sae = import_sae(Source("sparsify", str(folder)))
    _assert_forward(sae, x, z, z @ W_dec + b_dec)
    assert sae.provenance["toolkit"] == "sparsify" and len(sae.provenance["sha256"]) == 64


def _dl_files(tmp_path, cls, sd):
    d = tmp_path / cls
    d.mkdir()
    torch.save(sd, d / "ae.pt")
    (d / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls}}))
    return str(d / "ae.pt")


def test_dictionary_learning_classes(tmp_path, x):
    enc_w, enc_b, dec_w, b = _rand(F, D, seed=6), _rand(F, seed=7), _rand(D, F, seed=8), _rand(D, seed=9)
    r = torch.relu((x - b) @ enc_w.T + enc_b)
    # AutoEncoder: one bias, subtracted before and added after; decoder stored [D, F].
    path = _dl_files(tmp_path, "AutoEncoder", {"bias": b, "encoder.weight": enc_w, "encoder.bias": enc_b,
                                               "decoder.weight": dec_w})
    _assert_forward(import_sae(Source("dictionary_learning", path)), x, r, r @ dec_w.T + b)
    topk = {"b_dec": b, "k": torch.tensor(K, dtype=torch.int32), "threshold": torch.tensor(0.4),
            "encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w}
    z = _topk_rows(r, K)  # AutoEncoderTopK's forward: per-row top k (its threshold is for training)
    _assert_forward(import_sae(Source("dictionary_learning", _dl_files(tmp_path, "AutoEncoderTopK", topk))),
                    x, z, z @ dec_w.T + b)
    z = r * (r > 0.4)  # BatchTopKSAE at inference: the scalar threshold, strict
    _assert_forward(import_sae(Source("dictionary_learning", _dl_files(tmp_path, "BatchTopKSAE", topk))),
                    x, z, z @ dec_w.T + b)
    # JumpReLU: no pre-encoder bias, raw per-latent thresholds, W_enc stored [D, F].
    thr = torch.rand(F, generator=torch.Generator().manual_seed(10))
    jump = {"W_enc": enc_w.T, "b_enc": enc_b, "W_dec": dec_w.T, "b_dec": b, "threshold": thr}
    p = x @ enc_w.T + enc_b
    z = torch.relu(p * (p > thr))
    _assert_forward(import_sae(Source("dictionary_learning", _dl_files(tmp_path, "JumpReluAutoEncoder", jump))),
                    x, z, z @ dec_w.T + b)


def test_dictionary_learning_batchtopk_with_an_unestimated_threshold_is_refused(tmp_path):
    sd = {"b_dec": torch.zeros(D), "k": torch.tensor(K), "threshold": torch.tensor(-1.0),
          "encoder.weight": torch.zeros(F, D), "encoder.bias": torch.zeros(F), "decoder.weight": torch.zeros(D, F)}
    with pytest.raises(SAEImportError, match="never estimated"):
        import_sae(Source("dictionary_learning", _dl_files(tmp_path, "BatchTopKSAE", sd)))


def test_overcomplete_normalises_its_dictionary_and_compares_with_ge(tmp_path, x):
    enc_w, enc_b, W = _rand(F, D, seed=11), _rand(F, seed=12), _rand(F, D, seed=13) * 3
    mult, log_thr = torch.tensor(0.3), _rand(F, seed=14) * 0.5 - 1.0
    sd = {"encoder.final_block.0.weight": enc_w, "encoder.final_block.0.bias": enc_b, "dictionary._weights": W,
          "dictionary.multiplier": mult, "thresholds": log_thr}
    path = tmp_path / "jump.pt"
    torch.save(sd, path)
    r = torch.relu(x @ enc_w.T + enc_b)
    D_eff = W / (W.norm(dim=1, keepdim=True) + 1e-8) * torch.exp(mult)
    z = r * (r >= torch.exp(log_thr))
    _assert_forward(import_sae(Source("overcomplete", str(path), architecture="JumpSAE")), x, z, z @ D_eff)
    z = _topk_rows(r, K)
    _assert_forward(import_sae(Source("overcomplete", str(path), architecture="TopKSAE", k=K)), x, z, z @ D_eff)
    # A threshold that equals a code: >= keeps it (> would not).
    at = float(r.flatten()[r.flatten() > 0][0])
    z = r * (r >= at)
    _assert_forward(import_sae(Source("overcomplete", str(path), architecture="BatchTopKSAE", threshold=at)),
                    x, z, z @ D_eff)
    with pytest.raises(SAEImportError, match="running threshold"):
        import_sae(Source("overcomplete", str(path), architecture="BatchTopKSAE"))
    with pytest.raises(SAEImportError, match="--architecture"):
        import_sae(Source("overcomplete", str(path)))


def test_a_pickled_object_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # what torch.save(model) gives: a pickled module
    with pytest.raises(SAEImportError, match="not a plain state dict"):
        import_sae(Source("overcomplete", str(path), architecture="SAE"))


def test_missing_tensors_and_bad_shapes_name_what_was_found(tmp_path):
    path = tmp_path / "ae.pt"
    torch.save({"bias": torch.zeros(D)}, path)
    with pytest.raises(SAEImportError, match=r"missing \(found \['bias'\]\)"):
        import_sae(Source("dictionary_learning", str(path), architecture="AutoEncoder"))
    with pytest.raises(SAEImportError, match="do not fit one SAE"):
        ImportedSAE(torch.zeros(D, F), torch.zeros(F), torch.zeros(F, D + 1), torch.zeros(D), torch.zeros(D),
                    activation="relu")
    with pytest.raises(SAEImportError, match="non-finite"):
        ImportedSAE(torch.full((D, F), float("nan")), torch.zeros(F), torch.zeros(F, D), torch.zeros(D),
                    torch.zeros(D), activation="relu")
    with pytest.raises(SAEImportError, match="unknown SAE format 'saelens2'; allowed"):
        import_sae(Source("saelens2", str(path)))


def test_plain_layout_round_trips_and_our_batchtopk_is_the_threshold_form(tmp_path, x):
    sae = BatchTopKSAE(D, F, K)
    with torch.no_grad():
        sae.b_enc.copy_(_rand(F, seed=15) * 0.1)
        sae.b_dec.copy_(_rand(D, seed=16))
        sae.threshold.fill_(0.3)
    sae.eval()
    plain = tmp_path / "plain.safetensors"
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_pre": sae.b_dec, "b_dec": sae.b_dec,
               "threshold": sae.threshold}
    safetensors.torch.save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(plain),
                                metadata={"activation": "threshold", "compare": ">"})
    imported = import_sae(Source("plain", str(plain)))
    with torch.no_grad():
        want_z = sae.encode(x, use_threshold=True)
        _assert_forward(imported, x, want_z, sae.decode(want_z))
    out = tmp_path / "imported.safetensors"
    imported.save(out)
    again = ImportedSAE.load(out)
    assert again.provenance == imported.provenance and again.config() == imported.config()
    with torch.no_grad():
        _assert_forward(again, x, want_z, sae.decode(want_z))


def _saelens(tmp_path, name, tensors, cfg):
    folder = tmp_path / name
    folder.mkdir()
    safetensors.torch.save_file(tensors, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return str(folder)


def test_saelens_architectures_and_their_folds(tmp_path, x):
    W_enc, b_enc, W_dec, b_dec = _rand(D, F, seed=20), _rand(F, seed=21), _rand(F, D, seed=22), _rand(D, seed=23)
    base = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    # standard without apply_b_dec_to_input: nothing subtracted before the encoder.
    path = _saelens(tmp_path, "std", base, {"architecture": "standard", "d_in": D, "d_sae": F,
                                            "apply_b_dec_to_input": False, "normalize_activations": "none"})
    z = torch.relu(x @ W_enc + b_enc)
    _assert_forward(import_sae(Source("saelens", path)), x, z, z @ W_dec + b_dec)
    # topk with rescale_acts_by_decoder_norm: h times the decoder row norms, top-k, ReLU, divided back.
    path = _saelens(tmp_path, "topk", base, {"architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": True})
    n = W_dec.norm(dim=-1)
    h = ((x - b_dec) @ W_enc + b_enc) * n
    f = _topk_rows(torch.relu(h), K)
    sae = import_sae(Source("saelens", path))
    got_recon, _ = sae(x)
    torch.testing.assert_close(got_recon, (f / n) @ W_dec + b_dec, atol=1e-5, rtol=1e-6)
    # jumprelu stored as log_threshold (older files): relu(h) * (h > exp(log_threshold)).
    log_thr = _rand(F, seed=24) * 0.3 - 0.5
    path = _saelens(tmp_path, "jump", {**base, "log_threshold": log_thr}, {"architecture": "jumprelu"})
    h = (x - b_dec) @ W_enc + b_enc
    z = torch.relu(h) * (h > torch.exp(log_thr))
    _assert_forward(import_sae(Source("saelens", path)), x, z, z @ W_dec + b_dec)
    # 5.x: topk written as activation_fn_str + activation_fn_kwargs.
    path = _saelens(tmp_path, "v5", base, {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
                                           "normalize_activations": True})
    z = _topk_rows(torch.relu((x - b_dec) @ W_enc + b_enc), K)
    _assert_forward(import_sae(Source("saelens", path)), x, z, z @ W_dec + b_dec)
    path = _saelens(tmp_path, "ln", base, {"architecture": "standard", "normalize_activations": "layer_norm"})
    with pytest.raises(SAEImportError, match="layer_norm"):
        import_sae(Source("saelens", path))


def _saev(tmp_path, name, header, tensors):
    import io

    buf = io.BytesIO()
    torch.save(tensors, buf)
    path = tmp_path / name
    path.write_bytes((json.dumps(header) + "\n").encode() + buf.getvalue())
    return str(path)


def test_saev_generations_follow_their_own_math(tmp_path, x):
    W_enc, b_enc, W_dec, b_dec = _rand(D, F, seed=30), _rand(F, seed=31), _rand(F, D, seed=32), _rand(D, seed=33)
    sd = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    # PyPI 0.1.0: flat header, b_dec subtracted, ReLU.
    path = _saev(tmp_path, "old.pt", {"d_vit": D, "exp_factor": F // D, "sparsity_coeff": 4e-4}, sd)
    z = torch.relu((x - b_dec) @ W_enc + b_enc)
    _assert_forward(import_sae(Source("saev", path)), x, z, z @ W_dec + b_dec)
    # Schema 5 TopK: no b_dec subtraction, top-k of h kept with its sign (no ReLU).
    header = {"schema": 5, "cfg": {"d_model": D, "d_sae": F, "activation": {"cls": "TopK", "params": {"top_k": K}}}}
    low = {**sd, "b_enc": b_enc - 12}  # most pre-activations negative: a ReLU would zero the kept ones
    path = _saev(tmp_path, "topk.pt", header, low)
    h = x @ W_enc + low["b_enc"]
    idx = h.topk(K, dim=-1).indices
    z = torch.zeros_like(h).scatter_(-1, idx, h.gather(-1, idx))
    assert (z < 0).any()  # the sign is kept: the check is not vacuous
    _assert_forward(import_sae(Source("saev", path)), x, z, z @ W_dec + b_dec)
    # Schema 5 BatchTopK: one scalar threshold, strict.
    header["cfg"]["activation"] = {"cls": "BatchTopK", "params": {"top_k": K}}
    path = _saev(tmp_path, "btk.pt", header, {**sd, "activation.threshold": torch.tensor(0.7)})
    h = x @ W_enc + b_enc
    z = torch.where(h > 0.7, h, 0.0)
    _assert_forward(import_sae(Source("saev", path)), x, z, z @ W_dec + b_dec)
    with pytest.raises(SAEImportError, match="without its threshold"):
        import_sae(Source("saev", _saev(tmp_path, "btk_old.pt", {**header, "schema": 3}, sd)))


def test_saev_input_normalisation_is_folded_into_the_weights(tmp_path, x):
    """saev's loader fed its SAE x' = (x − m)·s and the SAE reconstructs x'; with the option the
    imported SAE takes raw x and returns raw x̂ = x̂'/s + m, codes unchanged."""
    W_enc, b_enc, W_dec, b_dec = _rand(D, F, seed=40), _rand(F, seed=41), _rand(F, D, seed=42), _rand(D, seed=43)
    m_D, s = _rand(D, seed=44) * 3, 0.37
    mean = tmp_path / "act_mean.safetensors"
    safetensors.torch.save_file({"act_mean": m_D}, str(mean))
    norm = InputNormalization(scale=s, mean=str(mean))
    xn = (x - m_D) * s  # what saev 0.1.0's Dataset.transform gave its SAE
    # PyPI 0.1.0: ReLU of (x' − b_dec) W_enc + b_enc.
    path = _saev(tmp_path, "old.pt", {"d_vit": D, "exp_factor": F // D}, {"W_enc": W_enc, "b_enc": b_enc,
                                                                         "W_dec": W_dec, "b_dec": b_dec})
    z = torch.relu((xn - b_dec) @ W_enc + b_enc)
    sae = import_sae(Source("saev", path, input_normalization=norm))
    _assert_forward(sae, x, z, (z @ W_dec + b_dec) / s + m_D)
    assert sae.provenance["input_normalization"]["scale"] == s and len(
        sae.provenance["input_normalization"]["mean_sha256"]) == 64
    # Schema 5 TopK: no b_dec subtraction, signed top-k of h.
    header = {"schema": 5, "cfg": {"d_model": D, "d_sae": F, "activation": {"cls": "TopK", "params": {"top_k": K}}}}
    path = _saev(tmp_path, "topk.pt", header, {"W_enc": W_enc, "b_enc": b_enc - 8, "W_dec": W_dec, "b_dec": b_dec})
    h = xn @ W_enc + (b_enc - 8)
    idx = h.topk(K, dim=-1).indices
    z = torch.zeros_like(h).scatter_(-1, idx, h.gather(-1, idx))
    assert (z < 0).any()
    _assert_forward(import_sae(Source("saev", path, input_normalization=norm)), x, z, (z @ W_dec + b_dec) / s + m_D)
    # Scale only (scale_mean off): nothing subtracted.
    z = torch.relu((x * s - b_dec) @ W_enc + b_enc)
    _assert_forward(import_sae(Source("saev", _saev(tmp_path, "old2.pt", {"d_vit": D}, {
        "W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}), input_normalization=InputNormalization(s))),
        x, z, (z @ W_dec + b_dec) / s)


def test_a_bad_input_mean_names_what_was_found(tmp_path):
    sd = {"W_enc": torch.zeros(D, F), "b_enc": torch.zeros(F), "W_dec": torch.zeros(F, D), "b_dec": torch.zeros(D)}
    path = _saev(tmp_path, "old.pt", {"d_vit": D}, sd)
    wrong, nan = tmp_path / "wrong.safetensors", tmp_path / "nan.safetensors"
    safetensors.torch.save_file({"act_mean": torch.zeros(D + 1)}, str(wrong))
    safetensors.torch.save_file({"act_mean": torch.full((D,), float("nan"))}, str(nan))
    with pytest.raises(SAEImportError, match=rf"shape \[{D}\].*found \{{'act_mean': \[{D + 1}\]\}}"):
        import_sae(Source("saev", path, input_normalization=InputNormalization(1.0, str(wrong))))
    with pytest.raises(SAEImportError, match="non-finite values in act_mean"):
        import_sae(Source("saev", path, input_normalization=InputNormalization(1.0, str(nan))))
    with pytest.raises(SAEImportError, match="must be a finite number > 0"):
        import_sae(Source("saev", path, input_normalization=InputNormalization(0.0)))


def test_sae_source_config_takes_an_input_normalisation():
    from pydantic import ValidationError

    from scope_ray.config import SAESourceConfig

    src = SAESourceConfig(format="saev", path="sae.pt", input_normalization={"scale": 0.5, "mean": "m.safetensors"})
    assert (src.input_normalization.scale, src.input_normalization.mean) == (0.5, "m.safetensors")
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValidationError):
            SAESourceConfig(format="saev", path="sae.pt", input_normalization={"scale": bad})
