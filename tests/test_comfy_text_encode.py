"""LongAlign Text Encode against a real ComfyUI (in-process). Skips unless COMFYUI_PATH is set."""

import asyncio

import pytest
import torch

from comfy_support import host_clip, host_segment_reference, import_comfy, load_pack, requires_comfy
from longalign_core import split_segments
from longalign_core.examples import EXAMPLE_PROMPT

pytestmark = requires_comfy


@pytest.fixture(scope="module")
def pack():
    return load_pack()


@pytest.fixture(scope="module")
def node(pack):
    import sys

    return sys.modules[pack.__name__ + ".nodes.text_encode"].LongAlignTextEncode


@pytest.fixture(scope="module")
def clip_l():
    return host_clip("l")


def run_node(node, clip, text, budget=240, overflow="extend", split_mode="sentence", long_sentences="split"):
    out = node.execute(clip=clip, text=text, token_budget=budget, overflow=overflow, split_mode=split_mode,
                       long_sentences=long_sentences)
    conditioning, report, segments, tokens = out.args
    return conditioning, report


def expected(clip, text, budget=240):
    merged, pad = host_segment_reference(clip, [s.text for s in split_segments(text)])
    length = max(budget, -(-merged.shape[0] // budget) * budget)
    return torch.cat([merged, pad.expand(length - merged.shape[0], -1)])


def test_pack_registers_v3_node_with_tooltips(pack):
    ext = asyncio.run(pack.comfy_entrypoint())
    nodes = asyncio.run(ext.get_node_list())
    schemas = {n.GET_SCHEMA().node_id: n.GET_SCHEMA() for n in nodes}
    assert "LongAlignTextEncode" in schemas
    schema = schemas["LongAlignTextEncode"]
    assert schema.category == "LongAlign/conditioning"
    assert all(i.tooltip for i in schema.inputs)
    # segments/tokens were appended after the original outputs: saved links keep their slots
    assert [o.io_type for o in schema.outputs] == ["CONDITIONING", "STRING", "INT", "INT"]


def _node_verdict(pack, clip):
    """The trimmed-forward verdict the node's own cache holds for ``clip``'s current state."""
    import sys

    cache = sys.modules[pack.__name__ + ".nodes.text_encode"].SEGMENT_CACHE
    return cache.verdict(clip, cache.state_key(clip))


def test_sd1_matches_host_per_segment_encodes(pack, node, clip_l):
    conditioning, report = run_node(node, clip_l, EXAMPLE_PROMPT)
    # the packed trimmed forward did the work (it was checked, and did not fall back to the host)
    verdict = _node_verdict(pack, clip_l)
    assert verdict.usable and verdict.verified, verdict.reason
    assert len(conditioning) == 1
    cond, extra = conditioning[0]
    assert cond.shape == (1, 240, 768)
    torch.testing.assert_close(cond[0], expected(clip_l, EXAMPLE_PROMPT), atol=2e-4, rtol=1e-4)
    assert "14 segments" in report and "WARNING" not in report
    pooled = clip_l.encode_from_tokens(clip_l.tokenize(split_segments(EXAMPLE_PROMPT)[0].text), return_pooled=True)[1]
    torch.testing.assert_close(extra["pooled_output"], pooled, atol=2e-4, rtol=1e-4)


def test_sd1_matches_transformers_with_same_weights(node, clip_l):
    """Cross-host check: ComfyUI's CLIP object and transformers' CLIPTextModel, same weights, same result."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfy_support import CLIP_SHAPES, random_clip_text_state_dict
    from longalign_core import CLIPSegmentEncoder
    from longalign_core.clip_vocab import load_clip_tokenizer

    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, **CLIP_SHAPES["l"])
    model = CLIPTextModel(cfg).eval()
    sd = random_clip_text_state_dict("l", seed=0)
    prefix = "text_model." if hasattr(model, "text_model") else ""
    missing, unexpected = model.load_state_dict({prefix + k[len("text_model."):]: v for k, v in sd.items()},
                                                strict=False)
    assert not [m for m in missing if "position_ids" not in m] and not unexpected
    ours = CLIPSegmentEncoder(load_clip_tokenizer(), model).encode(EXAMPLE_PROMPT).cond[0]
    cond = run_node(node, clip_l, EXAMPLE_PROMPT)[0][0][0][0]
    torch.testing.assert_close(cond, ours, atol=5e-4, rtol=1e-3)


def test_300_token_prompt_extends_with_no_loss(node, clip_l):
    prompt = EXAMPLE_PROMPT + " " + EXAMPLE_PROMPT.replace("lighthouse", "windmill")[:420]
    conditioning, report = run_node(node, clip_l, prompt)
    cond = conditioning[0][0]
    assert cond.shape[1] == 480 and "extended to 480" in report
    torch.testing.assert_close(cond[0], expected(clip_l, prompt), atol=2e-4, rtol=1e-4)
    cut, cut_report = run_node(node, clip_l, prompt, overflow="truncate")
    assert cut[0][0].shape[1] == 240 and "cut at the token budget" in cut_report
    with pytest.raises(ValueError, match="token budget"):
        run_node(node, clip_l, prompt, overflow="error")


def test_clip_skip_is_honoured(node, clip_l):
    skipped = clip_l.clone()
    skipped.clip_layer(-2)
    cond = run_node(node, skipped, EXAMPLE_PROMPT)[0][0][0][0]
    torch.testing.assert_close(cond, expected(skipped, EXAMPLE_PROMPT), atol=2e-4, rtol=1e-4)
    assert not torch.allclose(cond, run_node(node, clip_l, EXAMPLE_PROMPT)[0][0][0][0], atol=1e-3)


def test_clip_lora_is_honoured_and_cache_follows_patches(node, clip_l):
    comfy = import_comfy()
    torch.manual_seed(1)
    lora = {}
    for layer in range(12):
        base = f"lora_te_text_model_encoder_layers_{layer}_mlp_fc1"
        lora[base + ".lora_up.weight"] = torch.randn(3072, 4) * 0.05
        lora[base + ".lora_down.weight"] = torch.randn(4, 768) * 0.05
    _, patched = comfy.sd.load_lora_for_models(None, clip_l, lora, 0.0, 1.0)
    before = run_node(node, clip_l, EXAMPLE_PROMPT)[0][0][0][0]
    after = run_node(node, patched, EXAMPLE_PROMPT)[0][0][0][0]
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, expected(patched, EXAMPLE_PROMPT), atol=2e-4, rtol=1e-4)
    # The unpatched CLIP still gets its own (cached) result.
    torch.testing.assert_close(run_node(node, clip_l, EXAMPLE_PROMPT)[0][0][0][0], before)


def _clip_lora_file(folder, seed=4):
    """A kohya CLIP LoRA on every fc1 of CLIP-L, saved where ComfyUI's LoraLoader looks (``loras``)."""
    from safetensors.torch import save_file

    import_comfy()
    import folder_paths

    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for layer in range(12):
        base = f"lora_te_text_model_encoder_layers_{layer}_mlp_fc1"
        lora[base + ".lora_up.weight"] = torch.randn(3072, 4, generator=gen) * 0.05
        lora[base + ".lora_down.weight"] = torch.randn(4, 768, generator=gen) * 0.05
    save_file(lora, str(folder / "clip_style.safetensors"))
    folder_paths.add_model_folder_path("loras", str(folder))
    return "clip_style.safetensors"


@pytest.mark.parametrize("trimmed", ["correct", "wrong-after-the-change"])
def test_lora_strength_change_between_queued_prompts(pack, node, clip_l, tmp_path, monkeypatch, caplog, trimmed):
    """Two queued prompts, the CLIP LoRA's strength changed between them (ComfyUI's own LoraLoader, one instance
    as the server keeps it): the second output is the host's encode at the new strength. No stale segment (the
    same sentences were cached at the old strength) and no stale verdict: the new state is checked on its own,
    so a trimmed forward that is wrong only after the change is caught and the host encodes instead."""
    import sys

    import nodes as comfy_nodes

    name = _clip_lora_file(tmp_path)
    loader = comfy_nodes.LoraLoader()
    cache = sys.modules[pack.__name__ + ".nodes.text_encode"].SEGMENT_CACHE
    cache.clear()
    prompt = EXAMPLE_PROMPT
    _, clip_1 = loader.load_lora(None, clip_l, name, 0.0, 1.0)
    first = run_node(node, clip_1, prompt)[0][0][0][0]
    torch.testing.assert_close(first, expected(clip_1, prompt), atol=2e-4, rtol=1e-4)
    state_1 = cache.state_key(clip_1)
    assert cache.verdict(clip_1, state_1).verified

    if trimmed == "wrong-after-the-change":
        fastpath = _fastpath(pack).TrimmedClipForward
        original = fastpath._stream

        def slightly_off(m, chunks, layout, want_pooled):
            z, p = original(m, chunks, layout, want_pooled)
            return z + 2e-3 * z.abs().amax().clamp_min(1.0), p

        monkeypatch.setattr(fastpath, "_stream", staticmethod(slightly_off))
    _, clip_2 = loader.load_lora(None, clip_l, name, 0.0, 0.4)
    with caplog.at_level("INFO", logger="LongAlign"):
        second = run_node(node, clip_2, prompt)[0][0][0][0]
    monkeypatch.undo()
    want = expected(clip_2, prompt)
    assert not torch.allclose(want, first, atol=1e-3)  # the strength change matters
    torch.testing.assert_close(second, want, atol=2e-4, rtol=1e-4)
    state_2 = cache.state_key(clip_2)
    assert state_2 != state_1
    verdict_2 = cache.verdict(clip_2, state_2)
    if trimmed == "correct":
        assert verdict_2.usable and verdict_2.verified and "not used" not in caplog.text
    else:
        assert not verdict_2.usable and "trimmed CLIP forward not used" in caplog.text
        assert cache.verdict(clip_1, state_1).usable  # the old state's verdict is its own
    cache.clear()


def test_prompt_weights_are_honoured(node, clip_l):
    prompt = "A (red:1.6) cat sits on a chair. A (blue:0.5) dog sleeps."
    cond = run_node(node, clip_l, prompt)[0][0][0][0]
    torch.testing.assert_close(cond, expected(clip_l, prompt), atol=2e-4, rtol=1e-4)
    plain = run_node(node, clip_l, "A red cat sits on a chair. A blue dog sleeps.")[0][0][0][0]
    assert not torch.allclose(cond, plain, atol=1e-3)


def test_embeddings_are_honoured(tmp_path):
    from safetensors.torch import save_file

    comfy = import_comfy()
    from comfy_support import random_clip_text_state_dict

    save_file({"emb_params": torch.randn(3, 768) * 0.3}, str(tmp_path / "shiny.safetensors"))
    clip = comfy.sd.load_text_encoder_state_dicts([random_clip_text_state_dict("l", seed=3)],
                                                  embedding_directory=str(tmp_path),
                                                  model_options={"dtype": torch.float32})
    prompt = "A portrait in embedding:shiny style. A second sentence."
    tokens = clip.tokenize(split_segments(prompt)[0].text)["l"][0]
    assert any(torch.is_tensor(t[0]) for t in tokens), "embedding not picked up by the host tokenizer"
    pack = load_pack()
    import sys

    node = sys.modules[pack.__name__ + ".nodes.text_encode"].LongAlignTextEncode
    cond, report = run_node(node, clip, prompt)
    torch.testing.assert_close(cond[0][0][0], expected(clip, prompt), atol=2e-4, rtol=1e-4)
    # the trimmed forward handled the embedding row, checked against the host's own encode of it
    encoder, cache, state = _fresh_encoder(pack, clip)
    cond, _ = encoder.encode(prompt)
    verdict = cache.verdict(clip, state)
    assert verdict.usable and verdict.checked == {"embeddings"}
    torch.testing.assert_close(cond[0][0][0], expected(clip, prompt), atol=2e-4, rtol=1e-4)
    # The embedding file replaced on disk: the next prompt uses the new vectors (its sentence is not served from
    # the tokens cached for the old file).
    save_file({"emb_params": torch.randn(3, 768) * 0.3}, str(tmp_path / "shiny.safetensors"))
    again, _ = run_node(node, clip, prompt)
    assert not torch.allclose(again[0][0][0], cond[0][0][0], atol=1e-3)
    torch.testing.assert_close(again[0][0][0], expected(clip, prompt), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("fast", [True, False], ids=["trimmed-forward", "host-path"])
def test_cache_reencodes_only_the_edited_sentence(pack, clip_l, fast, monkeypatch):
    import sys

    mod = sys.modules[pack.__name__ + ".nodes.clip_segments"]
    fastpath = sys.modules[pack.__name__ + ".nodes.clip_fastpath"].TrimmedClipForward
    cache = mod.SegmentCache()
    mod.HostClipSegments(clip_l, cache, fast=fast).encode(EXAMPLE_PROMPT)
    assert cache.misses == 14 and cache.hits == 0
    edited = EXAMPLE_PROMPT.replace("black cat", "ginger cat")
    host_rows, trimmed_rows = [], []
    host_encode, trimmed_encode = clip_l.encode_from_tokens_scheduled, fastpath.encode
    monkeypatch.setattr(clip_l, "encode_from_tokens_scheduled",
                        lambda tokens, *a, **kw: host_rows.append(len(tokens["l"])) or host_encode(tokens, *a, **kw),
                        raising=False)
    monkeypatch.setattr(fastpath, "encode",
                        lambda self, rows, *a: trimmed_rows.append(len(rows)) or trimmed_encode(self, rows, *a))
    cond, _ = mod.HostClipSegments(clip_l, cache, fast=fast).encode(edited)
    assert cache.hits == 13 and cache.misses == 15
    if fast:
        assert host_rows == [] and trimmed_rows == [1]  # the edited sentence only: this model state was checked
    else:
        assert host_rows == [1] and trimmed_rows == []
    monkeypatch.undo()
    torch.testing.assert_close(cond[0][0][0], expected(clip_l, edited), atol=2e-4, rtol=1e-4)


def _fresh_encoder(pack, clip):
    """A HostClipSegments with its own cache (so its trimmed-forward verdict starts unchecked)."""
    import sys

    mod = sys.modules[pack.__name__ + ".nodes.clip_segments"]
    cache = mod.SegmentCache()
    return mod.HostClipSegments(clip, cache), cache, mod.SegmentCache.state_key(clip)


def _fastpath(pack):
    import sys

    return sys.modules[pack.__name__ + ".nodes.clip_fastpath"]


def test_trimmed_forward_falls_back_when_its_check_fails(pack, clip_l, monkeypatch, caplog):
    fastpath = _fastpath(pack).TrimmedClipForward
    original = fastpath._stream

    def broken(m, chunks, layout, want_pooled):
        z, p = original(m, chunks, layout, want_pooled)
        return z + 0.5, p

    monkeypatch.setattr(fastpath, "_stream", staticmethod(broken))
    encoder, cache, state = _fresh_encoder(pack, clip_l)
    with caplog.at_level("INFO", logger="LongAlign"):
        cond, _ = encoder.encode(EXAMPLE_PROMPT)
    assert "trimmed CLIP forward not used" in caplog.text
    assert cache.verdict(clip_l, state).usable is False
    torch.testing.assert_close(cond[0][0][0], expected(clip_l, EXAMPLE_PROMPT), atol=2e-4, rtol=1e-4)


def test_trimmed_forward_check_rejects_an_error_20x_its_tolerance(pack, clip_l, monkeypatch, caplog):
    """The check's tolerance is float rounding (1e-4 of the states' magnitude): an error 20 times that, still
    small next to the states, must be refused."""
    mod = _fastpath(pack)
    original = mod.TrimmedClipForward._stream

    def slightly_off(m, chunks, layout, want_pooled):
        z, p = original(m, chunks, layout, want_pooled)
        return z + 2e-3 * z.abs().amax().clamp_min(1.0), p  # 20 × the check's 1e-4, written out

    monkeypatch.setattr(mod.TrimmedClipForward, "_stream", staticmethod(slightly_off))
    encoder, cache, state = _fresh_encoder(pack, clip_l)
    with caplog.at_level("INFO", logger="LongAlign"):
        cond, _ = encoder.encode("A cat sits on a chair. A dog sleeps.")
    assert "trimmed CLIP forward not used" in caplog.text
    assert cache.verdict(clip_l, state).usable is False
    torch.testing.assert_close(cond[0][0][0], expected(clip_l, "A cat sits on a chair. A dog sleeps."),
                               atol=2e-4, rtol=1e-4)


def test_trimmed_forward_is_used_and_checked_on_a_weighted_row(pack, clip_l, caplog):
    """Prompt weights go through the trimmed forward (not silently through the host) and equal the host's."""
    prompt = "A (red:1.6) cat sits on a chair. A (blue:0.5) dog sleeps."
    encoder, cache, state = _fresh_encoder(pack, clip_l)
    with caplog.at_level("INFO", logger="LongAlign"):
        cond, _ = encoder.encode(prompt)
    verdict = cache.verdict(clip_l, state)
    assert "not used" not in caplog.text and verdict.usable and verdict.checked == {"weights"}
    torch.testing.assert_close(cond[0][0][0], expected(clip_l, prompt), atol=2e-4, rtol=1e-4)


def test_wrong_weight_rule_in_the_trimmed_forward_is_caught(pack, clip_l, monkeypatch, caplog):
    mod = _fastpath(pack)

    def plain_scaling(z, chunks, empty):  # z * w instead of ComfyUI's (z - z_empty) * w + z_empty
        for row, chunk in enumerate(chunks):
            w = torch.tensor([float(e[1]) for e in chunk[: z.shape[1]]], dtype=z.dtype)
            z[row] = z[row] * w[:, None]
        return z

    monkeypatch.setattr(mod.TrimmedClipForward, "_apply_weights", staticmethod(plain_scaling))
    prompt = "A (red:1.6) cat sits on a chair. A dog sleeps."
    encoder, cache, state = _fresh_encoder(pack, clip_l)
    with caplog.at_level("INFO", logger="LongAlign"):
        cond, _ = encoder.encode(prompt)
    assert "row with weights" in caplog.text and cache.verdict(clip_l, state).usable is False
    torch.testing.assert_close(cond[0][0][0], expected(clip_l, prompt), atol=2e-4, rtol=1e-4)


def test_out_of_memory_does_not_switch_the_trimmed_forward_off(pack, clip_l, monkeypatch):
    mod = _fastpath(pack)
    original, calls = mod.TrimmedClipForward.encode, []

    def oom_once(self, rows, *a):
        calls.append(len(rows))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, rows, *a)

    monkeypatch.setattr(mod.TrimmedClipForward, "encode", oom_once)
    encoder, cache, state = _fresh_encoder(pack, clip_l)
    first, _ = encoder.encode("A cat sits on a chair. A dog sleeps.")  # through the host this time
    assert cache.verdict(clip_l, state).usable is True
    second, _ = encoder.encode("A bird sings. A fish swims.")
    assert len(calls) == 2 and cache.verdict(clip_l, state).usable is True  # the trimmed forward ran again
    torch.testing.assert_close(first[0][0][0], expected(clip_l, "A cat sits on a chair. A dog sleeps."),
                               atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(second[0][0][0], expected(clip_l, "A bird sings. A fish swims."),
                               atol=2e-4, rtol=1e-4)


def test_interrupt_inside_the_trimmed_forward_propagates(pack, clip_l, monkeypatch):
    import_comfy()
    import comfy.model_management

    mod = _fastpath(pack)

    def interrupted(self, rows, *a):
        raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(mod.TrimmedClipForward, "encode", interrupted)
    encoder, cache, state = _fresh_encoder(pack, clip_l)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        encoder.encode("A cat sits on a chair.")
    assert cache.verdict(clip_l, state).usable is True


def test_fp16_text_encoder_trimmed_forward_matches_host(pack, caplog):
    """ComfyUI stores text encoders in fp16 on the CPU by default (computing in fp32 through manual casts); on a
    GPU fp16 storage is the norm too. The trimmed forward must match the host there, weights included."""
    comfy = import_comfy()
    from comfy_support import random_clip_text_state_dict

    clip = comfy.sd.load_text_encoder_state_dicts([random_clip_text_state_dict("l", seed=11)],
                                                  model_options={"dtype": torch.float16})
    assert clip.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight.dtype == torch.float16
    prompt = EXAMPLE_PROMPT.replace("black cat", "(black cat:1.3)")
    encoder, cache, state = _fresh_encoder(pack, clip)
    with caplog.at_level("INFO", logger="LongAlign"):
        cond, _ = encoder.encode(prompt)
    verdict = cache.verdict(clip, state)
    assert "not used" not in caplog.text and verdict.usable and "weights" in verdict.checked
    torch.testing.assert_close(cond[0][0][0], expected(clip, prompt), atol=2e-4, rtol=1e-4)


def test_clip_hooks_go_through_the_host_schedule(pack, clip_l):
    """With scheduled CLIP hooks the host returns one conditioning per keyframe; each is merged."""
    comfy = import_comfy()
    import comfy.hooks
    import sys

    mod = sys.modules[pack.__name__ + ".nodes.clip_segments"]
    torch.manual_seed(2)
    lora = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(3072, 4) * 0.1,
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 768) * 0.1}
    hooks = comfy.hooks.create_hook_lora(lora=lora, strength_model=0.0, strength_clip=1.0)
    kf = comfy.hooks.HookKeyframeGroup()
    kf.add(comfy.hooks.HookKeyframe(strength=1.0, start_percent=0.0))
    kf.add(comfy.hooks.HookKeyframe(strength=0.0, start_percent=0.5))
    hooks.set_keyframes_on_hooks(kf)
    from comfy_extras.nodes_hooks import SetClipHooks

    clip, = SetClipHooks().apply_hooks(clip_l, schedule_clip=True, apply_to_conds=False, hooks=hooks)
    conditioning, _ = mod.HostClipSegments(clip, mod.SegmentCache()).encode("A cat. A dog.")
    assert len(conditioning) == 2
    assert {c[1]["clip_start_percent"] for c in conditioning} == {0.0, 0.5}
    assert all(c[0].shape == (1, 240, 768) for c in conditioning)
    assert not torch.allclose(conditioning[0][0], conditioning[1][0], atol=1e-4)
    # The keyframe at strength 0 is the un-hooked CLIP.
    off = next(c for c in conditioning if c[1]["clip_start_percent"] == 0.5)[0]
    torch.testing.assert_close(off[0], expected(clip_l, "A cat. A dog."), atol=2e-4, rtol=1e-4)


def test_sd2_drops_padding_by_position(node):
    clip = host_clip("h", seed=5)
    tokens = clip.tokenize("a cat")["h"][0]
    assert tokens[-1][0] == 0  # SD2 pads with id 0, a real token
    prompt = "A cat! Two dogs. Three birds sing on a wire."
    cond, report = run_node(node, clip, prompt)
    assert cond[0][0].shape == (1, 240, 1024)
    torch.testing.assert_close(cond[0][0][0], expected(clip, prompt), atol=3e-4, rtol=1e-3)


def test_sdxl_two_encoders_and_pooled(pack, node):
    clip = host_clip("gl", seed=7)
    prompt = "A cat! Two dogs play in the snow."
    (cond, extra), = run_node(node, clip, prompt)[0]
    verdict = _node_verdict(pack, clip)
    assert verdict.usable and verdict.verified, verdict.reason
    assert cond.shape == (1, 240, 2048)
    torch.testing.assert_close(cond[0], expected(clip, prompt), atol=5e-4, rtol=1e-3)
    first = split_segments(prompt)[0].text
    pooled = clip.encode_from_tokens(clip.tokenize(first), return_pooled=True)[1]
    assert extra["pooled_output"].shape == (1, 1280)
    torch.testing.assert_close(extra["pooled_output"], pooled, atol=5e-4, rtol=1e-3)


def test_counts_outputs_match_the_host_tokenizer(node, clip_l):
    """segments and tokens: the host tokenizer's own count per expected segment, BREAK honoured."""
    text = "A red fox in the snow. A blue bird BREAK an owl, asleep on a branch."
    out = node.execute(clip=clip_l, text=text, token_budget=240, overflow="extend", split_mode="sentence",
                       long_sentences="split")
    _, report, segments, tokens = out.args
    pieces = ["A red fox in the snow.", "A blue bird", "an owl, asleep on a branch."]
    content = []
    for piece in pieces:
        ids = [t[0] for t in clip_l.tokenize(piece)["l"][0]]
        content.append(ids.index(49407) - 1)  # content tokens between the start and the first end token
    assert (segments, tokens) == (3, sum(content) + 3)
    assert "BREAK an owl" in report
    ref = node.execute(clip=clip_l, text=text, token_budget=240, overflow="extend", split_mode="reference",
                       long_sentences="split").args
    assert ref[2] == 2  # reference mode: BREAK is text, split only at "."
