"""Guided decoding with random logits: whatever the model would say, the grammar holds."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from serving.structured import GuideCompiler, GuidedDecoding, GuideSpec, GuideSpecError

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                    "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def compiler(request, tiny_model_dir, smollm2_dir) -> GuideCompiler:
    model_dir = tiny_model_dir if request.param == "tiny" else smollm2_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    eos = config["eos_token_id"]
    return GuideCompiler(tokenizer, vocab_size=config["vocab_size"],
                         stop_token_ids=eos if isinstance(eos, list) else [eos])


def generate(compiler: GuideCompiler, guides: list[GuideSpec | None], *, seed: int,
             max_steps: int = 200) -> list[list[int]]:
    """Sample every row from random logits under its guide until the grammar ends."""
    guided = GuidedDecoding(compiler)
    generator = torch.Generator().manual_seed(seed)
    ids = [f"r{i}" for i in range(len(guides))]
    outputs: list[list[int]] = [[] for _ in guides]
    stop = set(compiler.tokenizer_info.stop_token_ids)
    live = list(range(len(guides)))
    for _ in range(max_steps):
        if not live:
            break
        logits = torch.randn(len(live), compiler.vocab_size, generator=generator) * 3
        rows = guided.mask(logits, [ids[i] for i in live], [guides[i] for i in live])
        tokens = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        guided.accept([ids[i] for i in live], tokens.tolist(), rows)
        for position, index in enumerate(live):
            outputs[index].append(int(tokens[position]))
        live = [i for i in live if outputs[i][-1] not in stop or guides[i] is None]
        live = [i for i in live if len(outputs[i]) < max_steps and
                not (guides[i] is None and len(outputs[i]) >= 5)]
    guided.drop(ids)
    assert guided.num_active == 0
    return outputs


def text_of(compiler, tokenizer_dir, token_ids):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer.decode([t for t in token_ids
                             if t not in compiler.tokenizer_info.stop_token_ids])


@pytest.mark.parametrize("seed", range(4))
def test_every_constrained_row_is_valid_and_free_rows_share_the_batch(compiler, seed,
                                                                      tiny_model_dir,
                                                                      smollm2_dir):
    model_dir = tiny_model_dir if compiler.vocab_size < 10_000 else smollm2_dir
    guides = [GuideSpec.json_schema(SCHEMA), None, GuideSpec.json_object(),
              GuideSpec.choice(["yes", "no", "maybe not"], param="structured_outputs.choice"),
              GuideSpec.regex(r"[0-9]{3}-[a-z]{2}", param="structured_outputs.regex")]
    outputs = generate(compiler, guides, seed=seed)
    stop = set(compiler.tokenizer_info.stop_token_ids)
    # bounded grammars end within 200 random tokens; a free JSON object may not
    assert all(outputs[i][-1] in stop for i in (0, 3, 4))
    texts = [text_of(compiler, model_dir, tokens) for tokens in outputs]
    value = json.loads(texts[0])
    assert set(value) == {"name", "age", "tags"} and len(value["name"]) <= 8
    assert isinstance(value["age"], int) and value["age"] >= 0
    assert set(value["tags"]) <= {"a", "b"}
    if outputs[2][-1] in stop:
        assert isinstance(json.loads(texts[2]), dict)
    else:
        assert texts[2].startswith("{") and len(outputs[2]) == 200
    assert texts[3] in ("yes", "no", "maybe not")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", texts[4])
    assert len(outputs[1]) == 5  # the free row was sampled, unconstrained, alongside


def test_compiled_grammars_are_cached_per_spec(compiler):
    first = compiler.compile(GuideSpec.json_schema(SCHEMA))
    assert compiler.compile(GuideSpec.json_schema(json.dumps(SCHEMA))) is first


@pytest.mark.parametrize(("spec", "param"), [
    (lambda: GuideSpec.regex("(unclosed", param="structured_outputs.regex"),
     "structured_outputs.regex"),
    (lambda: GuideSpec.grammar("root ::= ", param="structured_outputs.grammar"),
     "structured_outputs.grammar"),
    (lambda: GuideSpec.json_schema({"type": "no-such-type"}), "response_format"),
])
def test_invalid_constraints_name_their_field(compiler, spec, param):
    with pytest.raises(GuideSpecError) as raised:
        compiler.compile(spec())
    assert raised.value.param == param


@pytest.mark.parametrize(("build", "message"), [
    (lambda: GuideSpec.json_schema("{not json"), "not JSON"),
    (lambda: GuideSpec.json_schema([1, 2]), "must be an object"),
    (lambda: GuideSpec.choice([], param="c"), "non-empty list"),
    (lambda: GuideSpec.regex("", param="r"), "non-empty string"),
    (lambda: GuideSpec.grammar("x" * 100_001, param="g"), "at most"),
])
def test_bad_specs_are_refused_before_compiling(build, message):
    with pytest.raises(GuideSpecError, match=message):
        build()


def test_schemas_keep_their_property_order_and_get_safe_bounds():
    from serving.structured.spec import SAFE_INTEGER, normalize_schema

    schema = {"type": "object", "properties": {
        "zeta": {"type": "integer"}, "alpha": {"type": ["integer", "null"], "maximum": 3},
        "name": {"type": "string", "minLength": 1, "maxLength": 4},
        "code": {"type": "string", "maxLength": 2, "pattern": "^[A-Z]+$"}}}
    spec = GuideSpec.json_schema(schema)
    assert list(json.loads(spec.value)["properties"]) == ["zeta", "alpha", "name", "code"]
    normal = normalize_schema(schema)["properties"]
    assert (normal["zeta"]["minimum"], normal["zeta"]["maximum"]) == (-SAFE_INTEGER,
                                                                      SAFE_INTEGER)
    assert "minimum" not in normal["alpha"]  # bounded already: left alone
    assert normal["name"] == {"type": "string", "pattern": '^[^\\x00-\\x1f"\\\\]{1,4}$'}
    assert normal["code"] == schema["properties"]["code"]  # its own pattern wins
    assert re.fullmatch(normal["name"]["pattern"].strip("^$"), "abc")
    assert not re.fullmatch(normal["name"]["pattern"].strip("^$"), "a\x18")


def test_past_its_end_or_after_a_failure_a_grammar_allows_only_eos(compiler):
    """`ignore_eos` and `min_tokens` keep a request going after its grammar accepted EOS;
    a matcher that raises must not take the engine loop down either."""
    guided = GuidedDecoding(compiler)
    guide = GuideSpec.choice(["ok"], param="structured_outputs.choice")
    stop = compiler.tokenizer_info.stop_token_ids
    for _ in range(6):  # "ok", EOS, then more steps past the end
        logits = torch.zeros(1, compiler.vocab_size)
        rows = guided.mask(logits, ["r"], [guide])
        token = int(logits.argmax())
        guided.accept(["r"], [token], rows)
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed == sorted(stop)

    class Broken:
        def is_terminated(self) -> bool:
            raise RuntimeError("xgrammar failed")

    guided._matchers["b"] = Broken()
    logits = torch.zeros(1, compiler.vocab_size)
    guided.mask(logits, ["b"], [guide])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == sorted(stop)
