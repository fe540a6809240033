"""GGUF export: Q4_1 bytes match ggml's layout, q/k rows follow llama.cpp, the merge stays exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qblora_pl.export import export_module, llama_permute_rows, pack_q4_1
from qblora_pl.export.gguf_tensors import llama_unpermute_rows
from qblora_pl.export.verify import fixed_token_batch, load_gguf, load_gguf_with_reader
from qblora_pl.merging import merged

gguf = pytest.importorskip("gguf")
Q4_1 = gguf.GGMLQuantizationType.Q4_1


def test_q4_1_packing_is_bit_exact_against_gguf_quants():
    g = torch.Generator().manual_seed(0)
    rows, n = 6, 128
    codes = torch.randint(0, 16, (rows, n), generator=g, dtype=torch.uint8)
    d = (torch.rand(rows, n // 32, generator=g) * 0.1).to(torch.float16)
    m = (torch.randn(rows, n // 32, generator=g) * 0.1).to(torch.float16)
    packed = pack_q4_1(codes, d, m)
    assert packed.shape == (rows, n // 32 * 20) and packed.dtype == np.uint8

    # gguf's numpy dequantizer reads exactly w = d * q + m from our bytes (fp32 arithmetic).
    expected = codes.float().reshape(rows, -1, 32) * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)
    assert np.array_equal(gguf.quants.dequantize(packed, Q4_1), expected.reshape(rows, n).numpy())

    # And the other way round: gguf's own Q4_1 bytes, split by our reading of block_q4_1, repack identically.
    reference = gguf.quants.quantize(torch.randn(rows, n, generator=g).numpy(), Q4_1)
    blocks = torch.from_numpy(reference.reshape(rows, n // 32, 20).copy())
    d2 = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    m2 = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
    qs = blocks[..., 4:]
    codes2 = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, n)
    assert np.array_equal(pack_q4_1(codes2, d2, m2), reference)


@pytest.mark.parametrize("n_head, n_head_kv", [(4, 4), (4, 2)])
def test_llama_permutation_matches_convert_script_and_inverts(n_head, n_head_kv):
    head_dim = 8
    rows = n_head_kv * head_dim
    w = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    permuted = llama_permute_rows(w, n_head, n_head_kv)
    # convert_hf_to_gguf.py: within a head, rotate-half pairs (i, i + head_dim/2) become rows (2i, 2i+1).
    half = head_dim // 2
    for h in range(n_head_kv):
        for i in range(half):
            assert torch.equal(permuted[h * head_dim + 2 * i], w[h * head_dim + i])
            assert torch.equal(permuted[h * head_dim + 2 * i + 1], w[h * head_dim + half + i])
    assert torch.equal(llama_unpermute_rows(permuted, n_head, n_head_kv), w)


def test_gguf_export_of_qablora_is_exact_q4_1(qablora_gqa_module, tmp_path):
    module = qablora_gqa_module
    config = module.model.config
    with merged(module.model):
        merged_weights = {
            name: layer.base_layer.dequantize()
            for name, layer in module.adapted_layers().items()
        }
    report = export_module(module, tmp_path, formats=["gguf"], log=lambda _: None)
    info = report["formats"]["gguf"]
    assert info["fallback_layers"] == [] and info["exact_q4_1_layers"] == len(merged_weights)

    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == 64
    assert field("llama.feed_forward_length") == 128 and field("llama.context_length") == 256
    assert field("llama.vocab_size") == config.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.ffn_down.weight"} <= set(tensors)

    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    offset_rounding = info["max_abs_offset_rounding"]
    assert 0 < offset_rounding < 1e-3  # merged float32 offsets rounded to fp16: the only loss
    for name, weight in merged_weights.items():
        block, short = int(name.split(".")[2]), name.rsplit(".", 1)[-1]
        tensor = tensors[f"blk.{block}.{names[short]}.weight"]
        assert tensor.tensor_type == Q4_1
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, Q4_1).copy())
        if short == "q_proj":
            weight = llama_permute_rows(weight, 4, 4)
        elif short == "k_proj":
            weight = llama_permute_rows(weight, 4, 2)
        # fp16 d and m: scales were fp16 already, offsets round by at most offset_rounding.
        assert (values - weight).abs().max() <= offset_rounding + 1e-6

    check = info["verification"]
    assert check["client"] == "transformers GGUF loader"
    assert check["max_abs_logit_diff"] < 0.05 and check["argmax_agreement"] == 1.0


def test_gguf_reader_fallback_client_agrees_with_transformers(qablora_gqa_module, tmp_path):
    export_module(qablora_gqa_module, tmp_path, formats=["gguf"], verify=False, log=lambda _: None)
    ids = fixed_token_batch(qablora_gqa_module.model.config.vocab_size)["input_ids"]
    ours = load_gguf_with_reader(tmp_path / "model.gguf")
    theirs, client = load_gguf(tmp_path / "model.gguf")
    assert client == "transformers GGUF loader"
    assert ours.config.num_key_value_heads == 2 and ours.config.max_position_embeddings == 256
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_int4_group_64_maps_onto_two_q4_1_blocks_exactly(gqa_model_dir, tmp_path):
    from tests.export.conftest import adapted_module

    module = adapted_module(gqa_model_dir, "qablora", group_size=64)
    with merged(module.model):
        down = module.model.get_submodule("model.layers.0.mlp.down_proj").base_layer.dequantize()
    report = export_module(module, tmp_path, formats=["gguf"], verify=False, log=lambda _: None)
    info = report["formats"]["gguf"]
    assert info["fallback_layers"] == [] and info["layer_types"]["Q4_1"] == 14
    tensor = next(t for t in gguf.GGUFReader(str(tmp_path / "model.gguf")).tensors if t.name == "blk.0.ffn_down.weight")
    values = torch.from_numpy(gguf.quants.dequantize(tensor.data, Q4_1).copy())
    assert (values - down).abs().max() <= info["max_abs_offset_rounding"] + 1e-6


# --------------------------------------------------------------------------------------------
# INT2 / INT3 / INT4 x g32 / g64 / g128: exact Q4_1
# --------------------------------------------------------------------------------------------

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def wide_chat_model_dir(tmp_path_factory):
    """A tied-embedding GQA Llama whose every d_in (128, 256) is a multiple of 128, with the tiny
    ChatML tokenizer (chat template, ``<s>`` prepended)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.conftest import tiny_llama_config
    from tests.data.tokenizer_fixture import build_tiny_chat_tokenizer

    directory = tmp_path_factory.mktemp("wide-chat-llama")
    build_tiny_chat_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = tiny_llama_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, hidden_size=128,
                               intermediate_size=256, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(5)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _q4_1_codes(tensor) -> torch.Tensor:
    """The 4-bit codes stored in a Q4_1 tensor read back from a file (rows, n)."""
    raw = torch.from_numpy(np.asarray(tensor.data).copy())
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 20)[..., 4:]
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(rows, -1)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int_b_group_g_exports_as_exact_q4_1(bits, group_size, wide_chat_model_dir, tmp_path):
    from tests.export.conftest import adapted_module

    module = adapted_module(wide_chat_model_dir, "qablora", bits=bits, group_size=group_size, std=0.3)
    layers = module.adapted_layers()
    base = {name: layer.base_layer.dequantize() for name, layer in layers.items()}
    with merged(module.model):
        parts = {
            name: (layer.base_layer.codes(), layer.base_layer.scales.float(), layer.base_layer.offsets.float())
            for name, layer in layers.items()
        }
        merged_weights = {name: layer.base_layer.dequantize() for name, layer in layers.items()}
    report = export_module(module, tmp_path, formats=["gguf"], verify=False, log=lambda _: None)
    info = report["formats"]["gguf"]
    assert info["fallback_layers"] == [] and info["layer_types"] == {"Q4_1": len(layers)}

    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings stay tied
    for name, weight in merged_weights.items():
        block, short = int(name.split(".")[2]), name.rsplit(".", 1)[-1]
        tensor = tensors[f"blk.{block}.{GGUF_NAMES[short]}.weight"]
        assert tensor.tensor_type == Q4_1, f"{name}: {tensor.tensor_type.name}, not Q4_1"
        codes, scales, offsets = parts[name]
        if short in ("q_proj", "k_proj"):
            n_kv = 4 if short == "q_proj" else 2
            weight, codes = llama_permute_rows(weight, 4, n_kv), llama_permute_rows(codes, 4, n_kv)
            scales, offsets = llama_permute_rows(scales, 4, n_kv), llama_permute_rows(offsets, 4, n_kv)
            base[name] = llama_permute_rows(base[name], 4, n_kv)
        # The file holds our b-bit codes unchanged (so none exceeds 2^b - 1) ...
        stored_codes = _q4_1_codes(tensor)
        assert torch.equal(stored_codes, codes) and int(stored_codes.max()) <= 2**bits - 1
        # ... and gguf's dequantization is w = fp16(scale) * q + fp16(offset), each group spread over g/32 blocks.
        d16 = scales.half().float().repeat_interleave(group_size, dim=1)
        m16 = offsets.half().float().repeat_interleave(group_size, dim=1)
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, Q4_1).copy())
        assert torch.equal(values, codes.float() * d16 + m16)
        # Against our dequantized merged weight the only error is that fp16 rounding.
        bound = float((offsets.half().float() - offsets).abs().max()) + (2**bits - 1) * float(
            (scales.half().float() - scales).abs().max())
        assert 0 < bound < 1e-3
        assert float((values - weight).abs().max()) <= bound * (1 + 1e-3) + 1e-7
        assert float((values - base[name]).abs().max()) > 100 * bound  # the merged update is in the file


def test_int8_falls_back_to_f16_and_says_why(wide_chat_model_dir, tmp_path):
    from qblora_pl.export.snapshot import ExportFallbackWarning
    from tests.export.conftest import adapted_module

    module = adapted_module(wide_chat_model_dir, "qablora", bits=8, group_size=32)
    with pytest.warns(ExportFallbackWarning, match=r"'f16' fallback \(INT8 g32 -> F16: INT8 codes \(0..255\) do not fit Q4_1's 4-bit codes"):
        report = export_module(module, tmp_path, formats=["gguf"], verify=False, log=lambda _: None)
    info = report["formats"]["gguf"]
    assert info["layer_types"] == {"F16": 14} and len(info["fallback_layers"]) == 14
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "model.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16


def test_a_group_that_is_not_a_multiple_of_32_has_no_exact_q4_1_form():
    # GroupwiseInt refuses g16 today; the writer still names the reason should such parts reach it.
    from qblora_pl.export.gguf_tensors import q4_1_exact_parts, q4_1_inexact_reason
    from qblora_pl.export.snapshot import QuantizedParts

    codes = torch.zeros(2, 64, dtype=torch.uint8)
    g16 = QuantizedParts(codes, torch.ones(2, 4, dtype=torch.float16), torch.zeros(2, 4), bits=4, group_size=16)
    assert q4_1_exact_parts(g16) is None
    assert q4_1_inexact_reason(g16) == ("group_size=16 is not a multiple of the Q4_1 block size 32 "
                                        "(a block would need two scales)")
    g64 = QuantizedParts(codes, torch.ones(2, 1, dtype=torch.float16), torch.zeros(2, 1), bits=3, group_size=64)
    assert q4_1_inexact_reason(g64) is None and q4_1_exact_parts(g64)[1].shape == (2, 2)


# --------------------------------------------------------------------------------------------
# Compact token embedding
# --------------------------------------------------------------------------------------------


def test_auto_embedding_is_q8_0_when_lossless_else_f16():
    from qblora_pl.export.gguf_tensors import _dense_array

    g = torch.Generator().manual_seed(0)
    Q8_0 = gguf.GGMLQuantizationType.Q8_0
    # An embedding read from a Q8_0 GGUF tensor: d * q with fp16 d and int8 q, |q| <= 127 with 127 reached.
    q = torch.randint(-127, 128, (8, 64), generator=g).float()
    q[:, ::32] = 127.0
    d = (torch.rand(8, 2, generator=g) * 0.01 + 1e-3).half().float()
    from_q8_0 = (q.reshape(8, 2, 32) * d.unsqueeze(-1)).reshape(8, 64)
    array, raw_type = _dense_array(from_q8_0, "auto", compact=True)
    assert raw_type == Q8_0
    assert np.array_equal(gguf.quants.dequantize(array, Q8_0), from_q8_0.numpy())
    # A float32 embedding that Q8_0 would change is written as F16; 'f32' keeps it, frozen dense layers stay F32.
    plain = torch.randn(8, 64, generator=g)
    array, raw_type = _dense_array(plain, "auto", compact=True)
    assert raw_type is None and array.dtype == np.float16
    assert _dense_array(plain, "f32", compact=True)[0].dtype == np.float32
    assert _dense_array(plain, "auto")[0].dtype == np.float32
    with pytest.raises(ValueError, match="'int4' must be 'auto', 'f32', 'f16' or 'q8_0'"):
        _dense_array(plain, "int4")


def test_export_writes_the_embedding_compact_and_reports_its_rounding(wide_chat_model_dir, tmp_path):
    from tests.export.conftest import adapted_module

    module = adapted_module(wide_chat_model_dir, "qablora")
    embedding = module.model.get_input_embeddings().weight.detach().float()
    info = export_module(module, tmp_path / "auto", formats=["gguf"], verify=False, log=lambda _: None)["formats"]["gguf"]
    f32 = export_module(module, tmp_path / "f32", formats=["gguf"], verify=False, gguf_dense_type="f32",
                        log=lambda _: None)["formats"]["gguf"]
    report = info["dense_tensors"]["token_embd.weight"]
    assert report["gguf_type"] == "F16" and f32["dense_tensors"]["token_embd.weight"]["gguf_type"] == "F32"
    assert report["max_abs_error"] == float((embedding.half().float() - embedding).abs().max()) > 0
    assert f32["bytes"] - info["bytes"] == embedding.numel() * 2  # 4 -> 2 bytes a value
    tensor = next(t for t in gguf.GGUFReader(str(tmp_path / "auto" / "model.gguf")).tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F16


# --------------------------------------------------------------------------------------------
# Tokenizer settings
# --------------------------------------------------------------------------------------------


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()
            if key.startswith("tokenizer.") and key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                            "tokenizer.ggml.merges")}


def _converted_from_gguf(model_dir, tmp_path, **settings):
    """A copy of ``model_dir`` recorded as made by sources.convert_gguf from a (tensor-less) .gguf file
    whose tokenizer settings are ``settings``: writer method name (add_tokenizer_model, ...) -> value."""
    import json
    import shutil

    converted = tmp_path / "converted"
    shutil.copytree(model_dir, converted)
    source = tmp_path / "source.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    for method, value in settings.items():
        getattr(writer, method)(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (converted / "qblora_gguf_source.json").write_text(json.dumps({"gguf_file": str(source)}))
    return converted, source


def test_tokenizer_settings_are_derived_from_the_hf_tokenizer(wide_chat_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from tests.export.conftest import adapted_module

    module = adapted_module(wide_chat_model_dir, "qablora")
    vocab = export_module(module, tmp_path, formats=["gguf"], verify=False, log=lambda _: None)["formats"]["gguf"]["vocab"]
    fields = _fields(tmp_path / "model.gguf")
    tokenizer = AutoTokenizer.from_pretrained(wide_chat_model_dir)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    # The fixture's tokenizer is no tokenizer llama.cpp knows: its default BPE pre-tokenizer, and the report says so.
    assert fields["tokenizer.ggml.pre"] == "default" and "not recognized" in vocab["settings_from"]
    # It prepends <s> and appends nothing: add-BOS true, add-EOS false.
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_tokenizer_settings_of_a_gguf_source_are_carried_over(wide_chat_model_dir, tmp_path):
    from tests.export.conftest import adapted_module

    # A directory made by sources.convert_gguf records its .gguf file; the export takes the
    # tokenizer settings from that file, not from the HF files (which differ here on purpose).
    converted, source = _converted_from_gguf(
        wide_chat_model_dir, tmp_path, add_tokenizer_model="gpt2", add_tokenizer_pre="smollm", add_add_bos_token=False,
        add_add_eos_token=True, add_chat_template="{{ messages[0]['content'] }}")

    module = adapted_module(converted, "qablora")
    vocab = export_module(module, tmp_path / "out", formats=["gguf"], verify=False, log=lambda _: None)["formats"]["gguf"]["vocab"]
    fields = _fields(tmp_path / "out" / "model.gguf")
    assert vocab["settings_from"] == f"source GGUF {source}"
    assert fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.add_eos_token"] is True
    assert fields["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"


def test_sentencepiece_settings_follow_the_model_and_its_config():
    from sentencepiece import sentencepiece_model_pb2

    from qblora_pl.export.gguf_vocab import tokenizer_settings
    from qblora_pl.paths import EMBEDDED_MODEL_DIR

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((EMBEDDED_MODEL_DIR / "tokenizer.model").read_bytes())
    settings = tokenizer_settings(EMBEDDED_MODEL_DIR, "llama")
    assert settings["pre"] == "default" and settings["add_bos"] is True and settings["add_eos"] is False
    assert settings["add_space_prefix"] == proto.normalizer_spec.add_dummy_prefix


def test_a_gguf_source_with_another_tokenizer_kind_is_not_copied(wide_chat_model_dir, tmp_path):
    from qblora_pl.export.gguf_vocab import tokenizer_settings

    # SentencePiece ("llama") settings would not fit the BPE vocabulary we write
    converted, _ = _converted_from_gguf(wide_chat_model_dir, tmp_path, add_tokenizer_model="llama",
                                        add_add_bos_token=False)
    settings = tokenizer_settings(converted, "gpt2")
    assert settings["origin"].startswith("derived from") and settings["add_bos"] is True


def test_embedding_keeps_the_source_gguf_type_when_it_holds_the_values(wide_chat_model_dir, tmp_path):
    import json
    import shutil

    from transformers import LlamaForCausalLM

    from qblora_pl.export.gguf_tensors import _dense_array
    from tests.export.conftest import adapted_module

    # A model "converted" from a GGUF file whose token_embd is Q5_0: our float32 embedding is
    # exactly its dequantization, which Q8_0 would not hold; the export writes the source's bytes.
    Q5_0 = gguf.GGMLQuantizationType.Q5_0
    converted = tmp_path / "converted"
    shutil.copytree(wide_chat_model_dir, converted)
    model = LlamaForCausalLM.from_pretrained(converted)
    packed = gguf.quants.quantize(model.model.embed_tokens.weight.detach().numpy(), Q5_0)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.from_numpy(gguf.quants.dequantize(packed, Q5_0)))
    model.save_pretrained(converted)
    source = tmp_path / "source.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tensor("token_embd.weight", packed, raw_dtype=Q5_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (converted / "qblora_gguf_source.json").write_text(json.dumps({"gguf_file": str(source)}))

    module = adapted_module(converted, "qablora")
    report = export_module(module, tmp_path / "out", formats=["gguf"], verify=False, log=lambda _: None)
    assert report["formats"]["gguf"]["dense_tensors"]["token_embd.weight"]["gguf_type"] == "Q5_0"
    [written] = [t for t in gguf.GGUFReader(str(tmp_path / "out" / "model.gguf")).tensors if t.name == "token_embd.weight"]
    assert written.tensor_type == Q5_0 and np.array_equal(np.asarray(written.data), packed)
    # Values that are not the source's dequantization do not take its bytes.
    [source_tensor] = gguf.GGUFReader(str(source)).tensors
    embedding = module.model.get_input_embeddings().weight.detach().float()
    assert _dense_array(embedding, "auto", compact=True, source=source_tensor)[1] == Q5_0
    assert _dense_array(embedding + 1e-3, "auto", compact=True, source=source_tensor)[1] is None  # F16
