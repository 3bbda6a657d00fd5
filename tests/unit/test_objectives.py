"""The token objectives: masking statistics, reconstruction, hand-computed losses, attention structure."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import models
import objectives
from objectives import corruption as C
from objectives import special_tokens as st
from objectives.base import VAL_SEED

NUM_SENTINELS = 8
SPECIAL_NAMES = [st.EOS_TOKEN, st.PAD_TOKEN, st.MASK_TOKEN, *st.sentinel_tokens(NUM_SENTINELS), *st.MODE_TOKENS.values()]
SPECIAL = {name: i for i, name in enumerate(SPECIAL_NAMES)}
N_SPECIAL = len(SPECIAL)
VOCAB = 300
SENTINEL_IDS = {SPECIAL[st.sentinel_token(i)]: i for i in range(NUM_SENTINELS)}
ROLE_IDS = {"eos_id": SPECIAL[st.EOS_TOKEN], "pad_id": SPECIAL[st.PAD_TOKEN]}


def make(name: str, **params):
    obj = objectives.get(name, **params)
    obj.setup(special_tokens=SPECIAL, vocab_size=VOCAB, **ROLE_IDS)
    return obj


def rows(batch: int, row_len: int, seed: int = 0, eos_every: int | None = None) -> torch.Tensor:
    """Random non-special tokens, optionally with an EOS every ``eos_every`` positions (packed documents)."""
    t = torch.randint(N_SPECIAL, VOCAB, (batch, row_len), generator=torch.Generator().manual_seed(seed))
    if eos_every:
        t[:, eos_every - 1 :: eos_every] = SPECIAL[st.EOS_TOKEN]
    return t


class FixedLogits(torch.nn.Module):
    """A stand-in model: fixed logits whatever the input; records the keyword arguments of each call."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.calls: list[dict] = []

    def forward(self, input_ids, **kwargs):
        self.calls.append(kwargs)
        return self.logits[:, : input_ids.shape[1]]


def hand_ce(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cross-entropy over the positions with a target, with Python floats."""
    total, count = 0.0, 0
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            y = int(targets[b, t])
            if y == -100:
                continue
            row = [float(v) for v in logits[b, t]]
            total += math.log(sum(math.exp(v) for v in row)) - row[y]
            count += 1
    return total / count


def debug_model(max_seq_len: int = 64) -> models.DecoderLM:
    torch.manual_seed(0)
    return models.build("debug", vocab_size=VOCAB, max_seq_len=max_seq_len).eval()


@torch.no_grad()
def dependence(model, inputs: dict, b: int = 0) -> torch.Tensor:
    """(T, T) bool: [i, j] True when changing input token j of example b changes the logits at position i.

    One batched forward: copy j of the example has its token j replaced (same attention mask).
    """
    ids = inputs["input_ids"][b : b + 1]  # (1, T)
    T = ids.shape[1]
    copies = ids.repeat(T + 1, 1)  # (T+1, T): copy T is the original
    eye = torch.eye(T, dtype=torch.bool)
    copies[:T] = torch.where(eye, (copies[:T] + 1) % VOCAB, copies[:T])
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    if kwargs.get("attn_mask") is not None:
        mask = kwargs["attn_mask"]
        kwargs["attn_mask"] = mask[b : b + 1] if mask.shape[0] > 1 else mask
    logits = model(copies, **kwargs)  # (T+1, T, V)
    return (logits[:T] - logits[T:]).abs().amax(-1).T > 1e-6  # [i, j]


# ---- registry, special tokens ------------------------------------------------------------------


def test_registry_lists_the_objectives_and_their_special_tokens():
    assert {"causal_lm", "mlm", "span_corruption", "ul2", "self_distillation"} <= set(objectives.available())
    assert objectives.special_tokens_for("causal_lm") == []
    assert objectives.special_tokens_for("mlm") == ["<|mask|>"]
    assert objectives.special_tokens_for("span_corruption", num_sentinels=3) == [
        "<|sentinel_0|>", "<|sentinel_1|>", "<|sentinel_2|>"
    ]
    assert objectives.special_tokens_for("ul2", num_sentinels=2) == [
        "<|sentinel_0|>", "<|sentinel_1|>", "<|R|>", "<|X|>", "<|S|>"
    ]
    assert objectives.special_tokens_for("ul2", mode="S") == ["<|S|>"]  # a prefix LM needs no sentinels
    assert objectives.special_tokens_for("ul2", mode="S", mode_tokens=False) == []
    assert objectives.special_tokens_for("self_distillation", teacher="/nowhere") == ["<|mask|>"]


def test_missing_special_tokens_fail_naming_them_and_the_fix():
    obj = objectives.get("span_corruption", num_sentinels=2)
    with pytest.raises(ValueError) as e:
        obj.setup(
            special_tokens={st.EOS_TOKEN: 0, st.PAD_TOKEN: 1, "<|sentinel_0|>": 2},
            vocab_size=100,
            eos_id=0,
            pad_id=1,
        )
    msg = str(e.value)
    assert "<|sentinel_1|>" in msg and "<|sentinel_0|>" not in msg.split("lacks")[0]
    assert "data.prepare.special_tokens" in msg
    with pytest.raises(RuntimeError, match="setup"):
        objectives.get("mlm").prepare({"tokens": rows(2, 9)})


def test_bad_params_name_the_field():
    with pytest.raises(ValueError, match="mask_prob"):
        objectives.get("mlm", mask_prob=1.5)
    with pytest.raises(ValueError, match="exceeds 1"):
        objectives.get("mlm", mask_token_frac=0.9, random_token_frac=0.2)
    with pytest.raises(ValueError, match="prefix LM"):
        objectives.get("ul2", denoisers=[{"kind": "S", "noise_density": 0.5}])
    with pytest.raises(ValueError, match="needs mean_span_length"):
        objectives.get("ul2", denoisers=[{"kind": "R"}])
    with pytest.raises(ValueError, match="repeat"):
        objectives.get("ul2", denoisers=[{"kind": "S"}, {"kind": "S"}])
    with pytest.raises(ValueError, match="of kind X"):
        objectives.get("ul2", denoisers=[{"kind": "S"}], mode="X")
    with pytest.raises(ValueError, match="base_params"):
        objectives.get("self_distillation", teacher="t", base_params={"nope": 1})


def test_causal_lm_unchanged():
    obj = objectives.get("causal_lm", z_loss=1e-3)
    tokens = rows(2, 9)
    batch = obj.prepare({"tokens": tokens})
    assert torch.equal(batch["input_ids"], tokens[:, :-1]) and torch.equal(batch["targets"], tokens[:, 1:])
    logits = torch.randn(2, 8, VOCAB)
    model = FixedLogits(logits)
    loss, metrics = obj.loss(model, batch)
    assert model.calls == [{}]  # the default (fused causal) attention path
    assert set(metrics) == {"ce", "z"}
    assert loss.item() == pytest.approx(hand_ce(logits, tokens[:, 1:]) + 1e-3 * metrics["z"].item(), rel=1e-5)


# ---- mlm ---------------------------------------------------------------------------------------


def test_mlm_masking_statistics_on_a_large_seeded_batch():
    obj = make("mlm")
    tokens = rows(512, 129, eos_every=40)
    batch = obj.prepare({"tokens": tokens}, torch.Generator().manual_seed(0))
    inp, orig, tgt = batch["input_ids"], tokens[:, :-1], batch["targets"]
    picked = tgt != -100
    candidate = orig >= N_SPECIAL
    # exactly round(15%) of the non-special positions of every row; EOS never chosen
    assert torch.equal(picked.sum(1), torch.floor(candidate.sum(1) * 0.15 + 0.5).long())
    assert not (picked & ~candidate).any()
    assert torch.equal(tgt[picked], orig[picked])
    assert torch.equal(inp[~picked], orig[~picked])
    n = picked.sum().item()
    masked = (inp == SPECIAL[st.MASK_TOKEN]) & picked
    changed = (inp != orig) & picked & ~masked
    kept = (inp == orig) & picked
    # 80 / 10 / 10 (a random replacement equals the original with probability 1/(V - specials))
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.015)
    assert (n - masked.sum().item()) / n == pytest.approx(0.2, abs=0.015)
    assert changed.sum().item() / n == pytest.approx(0.1 * (1 - 1 / (VOCAB - N_SPECIAL)), abs=0.01)
    assert kept.sum().item() / n == pytest.approx(0.1, abs=0.01)
    assert bool((inp[changed] >= N_SPECIAL).all())  # random replacements are ordinary tokens
    # the choice is uniform over positions: every decile of the row gets about 15%
    has_candidates = candidate.any(0)  # every 40th position is always EOS
    per_pos = picked.float().sum(0)[has_candidates] / candidate.float().sum(0)[has_candidates]
    for chunk in per_pos.split(16):
        assert chunk.mean().item() == pytest.approx(0.15, abs=0.02)


def test_mlm_is_seeded_and_validation_is_deterministic():
    obj = make("mlm")
    tokens = rows(4, 33)
    a = obj.prepare({"tokens": tokens}, torch.Generator().manual_seed(5))
    b = obj.prepare({"tokens": tokens}, torch.Generator().manual_seed(5))
    c = obj.prepare({"tokens": tokens}, torch.Generator().manual_seed(6))
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["targets"], c["targets"])
    v1, v2 = obj.prepare({"tokens": tokens}, None), obj.prepare({"tokens": tokens}, None)
    assert torch.equal(v1["input_ids"], v2["input_ids"]) and torch.equal(v1["targets"], v2["targets"])
    seeded = obj.prepare({"tokens": tokens}, torch.Generator().manual_seed(VAL_SEED))
    assert torch.equal(v1["targets"], seeded["targets"])


def test_mlm_loss_equals_hand_computed_value_and_runs_bidirectional():
    obj = make("mlm", mask_prob=0.25, z_loss=0.0)
    tokens = rows(1, 9)
    batch = obj.prepare({"tokens": tokens}, torch.Generator().manual_seed(0))
    assert (batch["targets"] != -100).sum().item() == 2  # round(0.25 * 8)
    logits = torch.randn(1, 8, VOCAB, generator=torch.Generator().manual_seed(1))
    model = FixedLogits(logits)
    loss, metrics = obj.loss(model, batch)
    assert model.calls == [{"is_causal": False}]
    assert loss.item() == pytest.approx(hand_ce(logits, batch["targets"]), rel=1e-6)
    assert set(metrics) == {"ce", "z"}


def test_mlm_attention_is_bidirectional():
    obj = make("mlm")
    batch = obj.prepare({"tokens": rows(1, 17)}, torch.Generator().manual_seed(0))
    support = dependence(debug_model(), obj.model_inputs(batch))
    assert bool(support.all())  # every position sees every position, the future included


# ---- span corruption ---------------------------------------------------------------------------


def reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
    """Undo span corruption with Python lists: replace each sentinel of the inputs by its span."""
    spans: list[list[int]] = []
    for tok in targets:
        if tok in SENTINEL_IDS:
            spans.append([])
        else:
            spans[-1].append(tok)
    out, k = [], 0
    for tok in inputs:
        if tok in SENTINEL_IDS:
            assert SENTINEL_IDS[tok] == k % NUM_SENTINELS  # sentinels in order (cyclic past the last)
            out.extend(spans[k])
            k += 1
        else:
            out.append(tok)
    assert k == len(spans)
    return out


def split_sequence(batch: dict, b: int) -> tuple[list[int], list[int]]:
    """A prepared row's (inputs, targets) parts as lists: the full sequence is input_ids + the last label."""
    P = int(batch["prefix_len"][b])
    n = int(batch["length"][b])
    seq = [*batch["input_ids"][b].tolist(), int(batch["targets"][b, -1])]
    return seq[:P], seq[P:n]


@pytest.mark.parametrize("noise_density,mean_span_length", [(0.15, 3.0), (0.5, 3.0), (0.15, 8.0)])
def test_span_corruption_round_trips_to_the_original_window(noise_density, mean_span_length):
    obj = make("span_corruption", noise_density=noise_density, mean_span_length=mean_span_length,
               num_sentinels=NUM_SENTINELS)
    tokens = rows(16, 129, eos_every=50)
    batch = obj.prepare({"tokens": tokens}, torch.Generator().manual_seed(3))
    L = tokens.shape[1]
    n = C.fit_window(L, noise_density, mean_span_length)
    num_noise, k = C.span_counts(n, noise_density, mean_span_length)
    assert batch["input_ids"].shape[1] <= L - 1  # fits the model's seq_len by construction
    assert int(batch["length"][0]) == n + 2 * k
    for b in range(16):
        inputs, targets = split_sequence(batch, b)
        assert len(inputs) == n - num_noise + k and len(targets) == num_noise + k
        assert reconstruct(inputs, targets) == tokens[b, :n].tolist()
        assert (batch["targets"][b] != -100).sum().item() == len(targets)  # loss on the targets only


def test_span_corruption_reuses_sentinels_cyclically_with_a_warning(caplog):
    obj = make("span_corruption", noise_density=0.5, mean_span_length=2.0, num_sentinels=NUM_SENTINELS)
    tokens = rows(4, 129)
    with caplog.at_level("WARNING"):
        batch = obj.prepare({"tokens": tokens}, torch.Generator().manual_seed(0))
    assert "reused cyclically" in caplog.text
    n = C.fit_window(129, 0.5, 2.0)
    assert C.span_counts(n, 0.5, 2.0)[1] > NUM_SENTINELS
    for b in range(4):
        assert reconstruct(*split_sequence(batch, b)) == tokens[b, :n].tolist()


def composition_part_pmf(m: int, k: int, length: int) -> float:
    """P(a given part = length) for a uniformly random composition of m into k positive parts."""
    if k == 1:
        return float(length == m)
    return math.comb(m - length - 1, k - 2) / math.comb(m - 1, k - 1)


def test_span_noise_statistics_on_a_large_seeded_batch():
    g = torch.Generator().manual_seed(0)
    n, density, mu = 200, 0.15, 3.0
    is_noise, span_id = C.span_noise_mask(4000, n, density, mu, g)
    num_noise, k = C.span_counts(n, density, mu)
    assert (num_noise, k) == (30, 10)
    assert bool((is_noise.sum(1) == num_noise).all())  # the rate, exactly, in every row
    assert is_noise.float().mean().item() == pytest.approx(density, abs=0.5 / n)
    starts = is_noise & ~torch.cat([torch.zeros(4000, 1, dtype=torch.bool), is_noise[:, :-1]], 1)
    assert bool((starts.sum(1) == k).all())  # k separate spans (never adjacent)
    assert is_noise[:, 0].any() and is_noise[:, -1].any() and not is_noise[:, -1].all()  # no edge bias
    # span lengths: mean mu, and the distribution of a uniformly random composition of 30 into 10 parts
    lengths = torch.zeros(4000, k, dtype=torch.long)
    lengths.scatter_add_(1, span_id.masked_fill(~is_noise, 0), is_noise.long())
    assert lengths.float().mean().item() == pytest.approx(mu)
    counts = Counter(lengths.flatten().tolist())
    total = lengths.numel()
    tv = 0.5 * sum(abs(counts.get(ell, 0) / total - composition_part_pmf(num_noise, k, ell)) for ell in range(1, 22))
    assert tv < 0.01
    # where the noise falls is uniform along the row away from its two ends (spans must stay separate,
    # so the first / last few positions are noise less often, but never never)
    per_pos = is_noise.float().mean(0)
    assert per_pos[10:-10].min().item() > 0.12 and per_pos[10:-10].max().item() < 0.18
    assert per_pos[0].item() > 0.03 and per_pos[-1].item() > 0.03


def test_span_corruption_loss_equals_hand_computed_value():
    obj = make("span_corruption", num_sentinels=NUM_SENTINELS)
    batch = obj.prepare({"tokens": rows(2, 33)}, torch.Generator().manual_seed(0))
    T = batch["input_ids"].shape[1]
    logits = torch.randn(2, T, VOCAB, generator=torch.Generator().manual_seed(1))
    model = FixedLogits(logits)
    loss, metrics = obj.loss(model, batch)
    assert model.calls[0]["is_causal"] is False and model.calls[0]["attn_mask"].shape == (1, 1, T, T)
    assert loss.item() == pytest.approx(hand_ce(logits, batch["targets"]), rel=1e-6)
    assert set(metrics) == {"ce", "z"}


def test_span_corruption_prefix_is_bidirectional_and_targets_never_see_the_future():
    obj = make("span_corruption", num_sentinels=NUM_SENTINELS)
    batch = obj.prepare({"tokens": rows(1, 33)}, torch.Generator().manual_seed(0))
    P = int(batch["prefix_len"][0])
    support = dependence(debug_model(), obj.model_inputs(batch))
    T = support.shape[0]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) | (j < P)
    assert torch.equal(support, allowed)  # exactly the prefix-LM pattern
    assert bool(support[:P, :P].all())  # the corrupted input is read bidirectionally
    # no target position sees the token it predicts (targets[i] is input i + 1)
    assert not support[P - 1 :, P:].triu(diagonal=1).any()


# ---- ul2 ---------------------------------------------------------------------------------------


def test_ul2_samples_denoisers_by_weight_and_prepends_mode_tokens():
    obj = make("ul2", num_sentinels=NUM_SENTINELS)
    B = 3000
    tokens = rows(B, 65)
    batch = obj.prepare({"tokens": tokens}, torch.Generator().manual_seed(0))
    weights = torch.tensor([d.weight for d in obj.active])
    freq = torch.bincount(batch["denoiser"], minlength=len(weights)).float() / B
    torch.testing.assert_close(freq, weights / weights.sum(), atol=0.025, rtol=0)
    assert freq[-1].item() == pytest.approx(1 / 7, abs=0.025)  # S: one of the seven equal denoisers
    kinds = [d.kind for d in obj.active]
    first = batch["input_ids"][:, 0]
    for b in range(B):
        assert int(first[b]) == SPECIAL[st.MODE_TOKENS[kinds[int(batch["denoiser"][b])]]]
    assert batch["input_ids"].shape[1] <= 64
    assert bool((batch["prefix_len"] >= 2).all())


def test_ul2_default_mixture_is_the_papers_seven_denoisers_drawn_uniformly():
    # UL2 (arXiv 2205.05131, section 3.1.2): R (3, 0.15), (8, 0.15); X (3, 0.5), (8, 0.5), (64, 0.15),
    # (64, 0.5); one S; uniform over the seven, so every denoiser (S included) has probability 1/7.
    paper = [("R", 3, 0.15), ("R", 8, 0.15), ("X", 3, 0.5), ("X", 8, 0.5), ("X", 64, 0.15), ("X", 64, 0.5)]
    obj = make("ul2", num_sentinels=NUM_SENTINELS)
    assert [(d.kind, d.mean_span_length, d.noise_density) for d in obj.active] == [
        *paper, ("S", None, None)
    ]
    total = sum(d.weight for d in obj.active)
    assert [d.weight / total for d in obj.active] == pytest.approx([1 / 7] * 7, abs=1e-12)
    B = 7000
    batch = obj.prepare({"tokens": rows(B, 65)}, torch.Generator().manual_seed(3))
    counts = torch.bincount(batch["denoiser"], minlength=7).tolist()
    sd = math.sqrt((1 / 7) * (6 / 7) / B)  # binomial standard deviation of one frequency, about 0.0042
    for name, c in zip([d.name for d in obj.active], counts, strict=True):
        assert abs(c / B - 1 / 7) < 4 * sd, (name, c / B)


def test_ul2_every_denoiser_round_trips():
    obj = make("ul2", num_sentinels=NUM_SENTINELS)
    tokens = rows(200, 65, eos_every=20)
    batch = obj.prepare({"tokens": tokens}, torch.Generator().manual_seed(1))
    seen = set()
    for b in range(200):
        d = obj.active[int(batch["denoiser"][b])]
        seen.add(d.name)
        prefix, target = split_sequence(batch, b)
        mode, prefix = prefix[0], prefix[1:]
        assert mode == SPECIAL[st.MODE_TOKENS[d.kind]]
        if d.kind == "S":
            assert prefix + target == tokens[b, :64].tolist() and len(target) >= 1
        else:
            n = C.fit_window(65, d.noise_density, d.mean_span_length, 1)
            assert reconstruct(prefix, target) == tokens[b, :n].tolist()
        # padding after the row's end carries no loss
        assert (batch["targets"][b] != -100).sum().item() == len(target)
    assert seen == {d.name for d in obj.active}


def test_ul2_split_points_of_the_s_denoiser_are_uniform():
    obj = make("ul2", mode="S")
    batch = obj.prepare({"tokens": rows(4000, 65)}, torch.Generator().manual_seed(0))
    split = batch["prefix_len"] - 1  # tokens of the row in the prefix, 1 .. 63
    assert int(split.min()) == 1 and int(split.max()) == 63
    assert split.float().mean().item() == pytest.approx(32.0, abs=0.6)


def test_ul2_mode_switching_uses_only_that_paradigm():
    obj = make("ul2", mode="X", num_sentinels=NUM_SENTINELS)
    assert {d.kind for d in obj.active} == {"X"}
    batch = obj.prepare({"tokens": rows(64, 65)}, torch.Generator().manual_seed(0))
    assert bool((batch["input_ids"][:, 0] == SPECIAL["<|X|>"]).all())
    assert objectives.get("ul2").mode_token("S") == "<|S|>"
    only_s = objectives.get("ul2", mode="S")  # a tokenizer with just <|S|> is enough for S mode
    only_s.setup(
        special_tokens={st.EOS_TOKEN: 0, st.PAD_TOKEN: 1, "<|S|>": 2}, vocab_size=VOCAB, eos_id=0, pad_id=1
    )
    assert bool((only_s.prepare({"tokens": rows(4, 65)})["input_ids"][:, 0] == 2).all())
    plain = make("ul2", mode="S", mode_tokens=False)
    b2 = plain.prepare({"tokens": rows(8, 65)}, torch.Generator().manual_seed(0))
    assert torch.equal(b2["input_ids"], rows(8, 65)[:, :-1])  # a prefix LM over the row itself


def test_ul2_metrics_have_the_same_keys_on_every_call_and_add_up():
    obj = make("ul2", num_sentinels=NUM_SENTINELS)
    keys = None
    for seed in range(4):
        batch = obj.prepare({"tokens": rows(1, 65, seed)}, torch.Generator().manual_seed(seed))  # one denoiser
        T = batch["input_ids"].shape[1]
        logits = torch.randn(1, T, VOCAB, generator=torch.Generator().manual_seed(seed))
        loss, metrics = obj.loss(FixedLogits(logits), batch)
        keys = keys or set(metrics)
        assert set(metrics) == keys
        assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
        assert loss.item() == pytest.approx(hand_ce(logits, batch["targets"]), rel=1e-5)
    assert len(keys) == 2 + 2 * len(obj.active)
    batch = obj.prepare({"tokens": rows(32, 65)}, torch.Generator().manual_seed(0))
    logits = torch.randn(32, batch["input_ids"].shape[1], VOCAB)
    _, m = obj.loss(FixedLogits(logits), batch)
    ce_sum = sum(m[f"{d.name}/ce_sum"] for d in obj.active)
    tokens = sum(m[f"{d.name}/tokens"] for d in obj.active)
    assert tokens.item() == (batch["targets"] != -100).sum().item()
    assert (ce_sum / tokens).item() == pytest.approx(m["ce"].item(), rel=1e-5)


def test_ul2_attention_is_per_example_prefix_lm():
    obj = make("ul2", num_sentinels=NUM_SENTINELS)
    batch = obj.prepare({"tokens": rows(6, 33)}, torch.Generator().manual_seed(0))
    inputs = obj.model_inputs(batch)
    assert inputs["attn_mask"].shape[0] == 6 and inputs["is_causal"] is False
    model = debug_model()
    for b in (0, 3):
        P = int(batch["prefix_len"][b])
        support = dependence(model, inputs, b)
        T = support.shape[0]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        assert torch.equal(support, (j <= i) | (j < P))


# ---- self-distillation -------------------------------------------------------------------------


@pytest.fixture()
def teacher_dir(tmp_path):
    from models.io import save_pretrained

    teacher = debug_model()
    return save_pretrained(teacher, teacher.cfg, tmp_path / "teacher"), teacher


def test_self_distillation_distance_is_zero_when_student_is_teacher(teacher_dir):
    from models.io import load_pretrained

    path, _ = teacher_dir
    obj = make("self_distillation", teacher=str(path), weight=2.0)
    student, _ = load_pretrained(path)
    batch = obj.prepare({"tokens": rows(2, 65)}, torch.Generator().manual_seed(0))
    loss, metrics = obj.loss(student.eval(), batch)
    assert metrics["distance"].item() == 0.0
    base_loss, _ = obj.base.loss(student, batch)
    assert loss.item() == pytest.approx(base_loss.item(), rel=1e-6)
    assert set(metrics) == {"ce", "z", "distance"}


def hand_self_distillation(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, how: str) -> float:
    """Lee et al. (arXiv 2210.02871), section 3, with Python floats: one feature per example (here the
    mean / last position of the hidden states, or every position), squared L2 distance summed over the
    hidden dimensions, averaged over the features (MSE with reduction sum / batch size)."""

    def features(h: list) -> list[list[float]]:
        if how == "mean":
            return [[sum(tok[c] for tok in seq) / len(seq) for c in range(len(seq[0]))] for seq in h]
        if how == "last":
            return [seq[-1] for seq in h]
        return [tok for seq in h for tok in seq]

    fs, ft = features(student_hidden.tolist()), features(teacher_hidden.tolist())
    total = sum(sum((a - b) ** 2 for a, b in zip(u, v, strict=True)) for u, v in zip(fs, ft, strict=True))
    return total / len(fs)


@pytest.mark.parametrize("base", ["mlm", "causal_lm"])
@pytest.mark.parametrize("how", ["mean", "last", "all"])
def test_self_distillation_distance_is_the_papers_on_the_clean_input(teacher_dir, base, how):
    path, teacher = teacher_dir
    obj = make("self_distillation", teacher=str(path), base=base, weight=0.5, distill_tokens=how)
    torch.manual_seed(1)
    student = models.build("debug", vocab_size=VOCAB, max_seq_len=64).eval()
    tokens = rows(3, 65)
    clean = tokens[:, :64]  # the row before the base objective's corruption
    attention = {"is_causal": False} if base == "mlm" else {}
    with torch.no_grad():
        _, s_clean = student(clean, return_hidden=True, **attention)
        _, t_clean = teacher(clean, return_hidden=True, **attention)
    expected = hand_self_distillation(s_clean, t_clean, how)
    distances = []
    for seed in (0, 1):  # two different corruptions of the same rows
        batch = obj.prepare({"tokens": tokens}, torch.Generator().manual_seed(seed))
        loss, metrics = obj.loss(student, batch)
        assert metrics["distance"].item() == pytest.approx(expected, rel=1e-5)
        base_loss, _ = obj.base.loss(student, batch)  # the base objective on its own (corrupted) input
        assert loss.item() == pytest.approx(base_loss.item() + 0.5 * expected, rel=1e-5)
        distances.append(metrics["distance"].item())
        if base == "mlm":  # not the distance of the corrupted input
            with torch.no_grad():
                _, s_corrupt = student(batch["input_ids"], return_hidden=True, is_causal=False)
                _, t_corrupt = teacher(batch["input_ids"], return_hidden=True, is_causal=False)
            assert abs(hand_self_distillation(s_corrupt, t_corrupt, how) - expected) > 1e-3 * expected
    assert distances[0] == distances[1]


def test_self_distillation_teacher_is_frozen_and_the_student_learns(teacher_dir):
    path, _ = teacher_dir
    obj = make("self_distillation", teacher=str(path), base="causal_lm", weight=1.0, normalize=True)
    torch.manual_seed(1)
    student = models.build("debug", vocab_size=VOCAB, max_seq_len=64)
    batch = obj.prepare({"tokens": rows(2, 65)}, torch.Generator().manual_seed(0))
    loss, metrics = obj.loss(student, batch)
    assert metrics["distance"].item() > 0
    loss.backward()
    assert not obj.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # the distance term alone pulls the student toward the teacher
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    before = metrics["distance"].item()
    F = objectives.functional
    for _ in range(5):
        opt.zero_grad()
        inputs = obj.clean_inputs(batch)
        _, hidden = student(**inputs)
        with torch.no_grad():
            _, t_hidden = obj.teacher(**inputs)
        F.squared_distance(F.pool_hidden(hidden), F.pool_hidden(t_hidden), normalize=True).backward()
        opt.step()
    assert obj.loss(student, batch)[1]["distance"].item() < before


def test_self_distillation_errors_name_the_teacher(tmp_path, teacher_dir):
    with pytest.raises(FileNotFoundError, match="objective.teacher"):
        make("self_distillation", teacher=str(tmp_path / "missing"))
    path, _ = teacher_dir
    obj = objectives.get("self_distillation", teacher=str(path))
    with pytest.raises(ValueError, match="vocab_size"):
        obj.setup(special_tokens=SPECIAL, vocab_size=VOCAB + 1, **ROLE_IDS)


# ---- a released model's tokenizer: EOS / PAD by id, not by name ---------------------------------

# Llama-style: <unk> 0, <s> 1, </s> 2 and no pad token (pads with EOS); the objective tokens were added
# after the vocabulary by `rpt data prepare` (data.prepare.special_tokens).
STOCK_VOCAB = 300
STOCK_SPECIAL = {
    "<unk>": 0, "<s>": 1, "</s>": 2, st.MASK_TOKEN: 290,
    **{st.sentinel_token(i): 291 + i for i in range(4)},
    **{t: 295 + i for i, t in enumerate(st.MODE_TOKENS.values())},
}  # fmt: skip
STOCK_EOS = 2


def make_stock(name: str, **params):
    obj = objectives.get(name, **params)
    obj.setup(special_tokens=STOCK_SPECIAL, vocab_size=STOCK_VOCAB, eos_id=STOCK_EOS, pad_id=STOCK_EOS)
    return obj


def test_setup_takes_eos_and_pad_ids_whatever_the_tokens_are_called():
    cases = [("mlm", {}), ("span_corruption", {"num_sentinels": 4}), ("ul2", {"num_sentinels": 4})]
    for name, params in cases:
        obj = make_stock(name, **params)  # no <|eos|> / <|pad|> in the map: no error
        assert (obj.eos_id, obj.pad_id) == (STOCK_EOS, STOCK_EOS)
    with pytest.raises(ValueError, match=r"eos_id=300 is outside the vocabulary \[0, 300\).*tokenizer\."):
        objectives.get("causal_lm").setup(special_tokens={}, vocab_size=300, eos_id=300, pad_id=0)


def test_mlm_never_picks_eos_bos_or_pad_ids_of_a_stock_tokenizer():
    obj = make_stock("mlm")
    t = torch.randint(3, 290, (64, 65), generator=torch.Generator().manual_seed(0))
    t[:, ::16] = 1  # <s> at each document start
    t[:, 15::16] = STOCK_EOS  # </s> at each end
    batch = obj.prepare({"tokens": t}, torch.Generator().manual_seed(0))
    picked = batch["targets"] != -100
    inp = t[:, :-1]
    assert picked.any() and not (picked & (inp <= 2)).any()
    replaced = (batch["input_ids"] != inp) & (batch["input_ids"] != STOCK_SPECIAL[st.MASK_TOKEN])
    specials = torch.tensor(sorted(STOCK_SPECIAL.values()))
    assert replaced.any() and not torch.isin(batch["input_ids"][replaced], specials).any()
    # an EOS id absent from the name map is still never chosen
    only_mask = objectives.get("mlm")
    only_mask.setup(
        special_tokens={st.MASK_TOKEN: 290}, vocab_size=STOCK_VOCAB, eos_id=STOCK_EOS, pad_id=STOCK_EOS
    )
    picked = only_mask.prepare({"tokens": t}, torch.Generator().manual_seed(1))["targets"] != -100
    assert not (picked & (inp == STOCK_EOS)).any()


def test_denoisers_pad_with_the_pad_id_they_are_given():
    assert make_stock("ul2", num_sentinels=4).table().pad == STOCK_EOS
    assert make_stock("span_corruption", num_sentinels=4).table().pad == STOCK_EOS
    obj = make_stock("ul2", num_sentinels=4, mode_tokens=False)  # rows of 44: some are padded
    batch = obj.prepare({"tokens": torch.randint(3, 290, (256, 44))}, torch.Generator().manual_seed(0))
    ids, length = batch["input_ids"], batch["length"]
    pos = torch.arange(ids.shape[1])[None]
    padding = pos >= length[:, None]
    assert padding.any() and bool((ids[padding] == STOCK_EOS).all())
    assert not (batch["targets"][pos >= length[:, None] - 1] != -100).any()  # no loss on padding


def test_missing_objective_tokens_of_a_stock_tokenizer_name_the_fix():
    obj = objectives.get("span_corruption", num_sentinels=2)
    with pytest.raises(ValueError) as e:
        obj.setup(special_tokens={"<s>": 1, "</s>": 2}, vocab_size=100, eos_id=2, pad_id=2)
    msg = str(e.value)
    assert "['<|sentinel_0|>', '<|sentinel_1|>']" in msg.split("lacks")[0]
    assert "data.prepare.special_tokens: ['<|sentinel_0|>', '<|sentinel_1|>']" in msg
    assert "</s>" in msg  # what the tokenizer has
    with pytest.raises(ValueError, match=r"data.prepare.special_tokens: \['<\|mask\|>'\]"):
        objectives.get("mlm").setup(special_tokens={"</s>": 2}, vocab_size=100, eos_id=2, pad_id=2)
