"""Acceptance properties of influence on a causal language model (a tiny GPT-2 built from its config, float64).

1. **Padding changes nothing.** The same training sequences and query, right-padded by three more positions
   (attention mask 0, labels -100), must give the same scores: padded positions carry no loss, so they enter
   neither gradients nor curvature, nor the random draws of the sampled Fisher, nor the "auto" damping (which
   counts the model outputs the loss depends on, :meth:`datatrace.Task.output_counts`).
2. **EK-FAC against the exact Gauss-Newton matrix** on the same parameters: exact where the maths says it is
   (the eigenvalues are the Gauss-Newton diagonal in the Kronecker eigenbasis; scores where the Kronecker
   factorisation holds exactly), and measured where it is an approximation.
"""

from __future__ import annotations

import pytest
import torch

import datatrace
from datatrace.curvature.kfac import EKFAC, KFAC
from datatrace.hf import IGNORE_INDEX, CausalLMTask
from dict_data import DictDataset

N, T, V, EXTRA = 8, 5, 5, 3
WD = 1e-2


def gpt2(transformers, n_layer: int = 1, n_embd: int = 16, vocab: int = V, seed: int = 0):
    """A randomly initialised GPT-2 (not at a minimum: the "auto" damping takes its degrees-of-freedom rule)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double().eval()


def sequences(n: int = N, length: int = T, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids in 1..V-1 and their mask; sequences of lengths 3..length, right-padded with id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, length), generator=g)
    lengths = 3 + torch.arange(n) % (length - 2)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ids * mask, mask


def padded(
    ids: torch.Tensor, mask: torch.Tensor, extra: int, labels: torch.Tensor | None = None
) -> DictDataset:
    """The sequences right-padded by ``extra`` positions (id 0, mask 0, label -100)."""
    pad = torch.zeros(ids.shape[0], extra, dtype=torch.long)
    ids, mask = torch.cat([ids, pad], 1), torch.cat([mask, pad], 1)
    if labels is None:
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    else:
        labels = torch.cat([labels, pad + IGNORE_INDEX], 1)
    return DictDataset(input_ids=ids, attention_mask=mask, labels=labels)


ROUTES = {
    "ekfac-ggn": lambda m, t: datatrace.InfluenceFunction(m, t, curvature=EKFAC(), progress=False),
    "ekfac-sampled": lambda m, t: datatrace.InfluenceFunction(
        m, t, curvature=EKFAC(fisher="sampled", n_samples=2, random_state=1), progress=False
    ),
    "kfac-weighted": lambda m, t: datatrace.InfluenceFunction(
        m, t, curvature=KFAC(input_factor="weighted"), progress=False
    ),
    "kfac": lambda m, t: datatrace.InfluenceFunction(m, t, curvature=KFAC(), progress=False),
    "cg": lambda m, t: datatrace.InfluenceFunction(m, t, curvature="cg", progress=False),
    "projected-factorized": lambda m, t: datatrace.ProjectedInfluence(
        m, t, projector=datatrace.FactorizedProjector(), dtype=torch.float64, progress=False
    ),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_right_padding_does_not_change_the_scores(route, transformers):
    """Scores of padded and unpadded data agree to ``1e-9`` of the largest score (float64: the padded forward
    pass sums in another order, nothing else differs)."""
    model = gpt2(transformers, n_embd=24)  # p/2 above the dof target of 75 per output: padding would move it
    task = CausalLMTask(weight_decay=WD)
    ids, mask = sequences()
    query_ids, query_mask = sequences(2, seed=7)
    query_labels = query_ids.masked_fill(query_mask == 0, IGNORE_INDEX)
    query_labels[:, :2] = IGNORE_INDEX  # a prompt of two tokens, the rest a completion
    results = []
    for extra in (0, EXTRA):
        inf = ROUTES[route](model, task).fit(padded(ids, mask, extra))
        results.append(inf.score(padded(query_ids, query_mask, extra, query_labels)))
    plain, more = results[0].values, results[1].values
    assert torch.isfinite(plain).all() and plain.abs().amax() > 0
    torch.testing.assert_close(more, plain, rtol=1e-9, atol=1e-9 * float(plain.abs().amax()))
    damping = [r.metadata["damping"] for r in results]  # a number, or the policy's name ("auto")
    if isinstance(damping[0], str):
        assert damping[0] == damping[1]
    else:
        assert damping[0] == pytest.approx(damping[1], rel=1e-9)
    if route.startswith(("ekfac", "kfac")):  # the padded outputs are not counted: the same dof target
        rule = results[0].metadata["curvature"]["damping_rule"]
        assert rule.startswith("dof=") and rule == results[1].metadata["curvature"]["damping_rule"]


def test_the_auto_damping_counts_only_the_outputs_the_loss_depends_on(transformers):
    model = gpt2(transformers)
    task = CausalLMTask()
    ids, mask = sequences()
    batch = padded(ids, mask, EXTRA)[0]
    batch = {k: v[None] for k, v in batch.items()}
    with torch.no_grad():
        counts = task.output_counts(task.outputs(model, batch), batch)
    assert counts.tolist() == [
        (int(mask[0].sum()) - 1) * V
    ]  # every next token of the sequence, V logits each


# -- EK-FAC against the exact Gauss-Newton matrix ------------------------------------------------------------------

LAYERS = ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj")


def ekfac_and_gauss_newton(model, train, params=None):
    """EK-FAC (``fisher="ggn"``, damping 0) and the dense Gauss-Newton route on exactly EK-FAC's parameters, both
    with the task's weight decay as the only regulariser (so the two differ by the curvature alone)."""
    task = CausalLMTask(weight_decay=WD)
    if params is None:  # the blocks' layers (the default scope also covers the tied lm_head through a copy)
        params = [n for n, _ in model.named_parameters() if ".attn.c_" in n or ".mlp.c_" in n]
    ekfac = datatrace.InfluenceFunction(
        model, task, curvature=EKFAC(damping=0.0), params=params, progress=False
    ).fit(train)
    scope = list(ekfac.functional_model.space.names)
    gauss_newton = datatrace.InfluenceFunction(
        model, task, curvature="gauss-newton", damping=0.0, params=scope, progress=False
    ).fit(train)
    return ekfac, gauss_newton


def kronecker_basis(ekfac) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Per layer: its name, its basis vectors ``q_S,j (x) q_A,k`` in the flat parameter space (rows) and EK-FAC's
    eigenvalues for them (data term only)."""
    curvature, space = ekfac.curvature_, ekfac.functional_model.space
    shapes = dict(zip(space.names, space.shapes))
    out = []
    for layer in curvature.layers_:
        basis = torch.einsum("oj,ik->jkoi", layer.Q_S, layer.Q_A).reshape(-1, layer.out_dim, layer.a_dim)
        blocks = {name: torch.zeros(len(basis), *shapes[name], dtype=basis.dtype) for name in space.names}
        blocks.update(layer.scatter(basis, shapes))
        out.append((layer.name, space.flatten(blocks, batch_dims=1), layer.eigenvalues.reshape(-1)))
    return out


def test_ekfac_eigenvalues_are_the_gauss_newton_diagonal_in_the_kronecker_eigenbasis(transformers):
    """EK-FAC's eigenvalue of the basis vector ``u = q_S (x) q_A`` is ``(1/n) sum_i sum_c (u . g_ic)^2 = u^T G u``,
    the exact Gauss-Newton matrix ``G``'s diagonal in that basis (George et al. 2018), for every layer of a GPT-2
    with sequences of several tokens and padding: an identity, so ``1e-9`` of the largest eigenvalue (float64)."""
    model = gpt2(transformers, n_embd=8)
    ids, mask = sequences()
    ekfac, gauss_newton = ekfac_and_gauss_newton(model, padded(ids, mask, 1))
    G = gauss_newton.curvature_.matrix_ - WD * torch.eye(
        gauss_newton.functional_model.num_params, dtype=torch.float64
    )
    layers = kronecker_basis(ekfac)
    assert [name for name, _, _ in layers] == [*LAYERS[:1], "transformer.h.0.attn.c_proj", *LAYERS[1:]]
    for _, U, eigenvalues in layers:
        diagonal = torch.einsum("jp,pq,jq->j", U, G, U)
        torch.testing.assert_close(eigenvalues, diagonal, rtol=1e-9, atol=1e-9 * float(diagonal.max()))
        assert float(diagonal.max()) > 0


@pytest.mark.parametrize("layer", LAYERS)
def test_ekfac_gives_the_gauss_newton_scores_where_the_kronecker_factorisation_is_exact(layer, transformers):
    """One layer in scope (no cross-layer blocks left out) and one predicted token per sequence whose context is
    the same for every sequence (a shared first token): the layer's input row ``a`` is then the same for all
    examples (the second position's row carries no loss, so the weighted input factor gives it weight 0), its
    Gauss-Newton block is exactly ``S (x) a a^T`` and EK-FAC's Kronecker eigenbasis diagonalises it. The scores
    agree to ``1e-9`` of the largest (float64 rounding; measured 4e-16 to 2e-15)."""
    model = gpt2(transformers, n_embd=8)
    g = torch.Generator().manual_seed(3)
    train_ids = torch.stack([torch.ones(12, dtype=torch.long), torch.randint(1, V, (12,), generator=g)], 1)
    query_ids = torch.stack([torch.ones(3, dtype=torch.long), torch.randint(1, V, (3,), generator=g)], 1)
    train = padded(train_ids, torch.ones_like(train_ids), 0)
    query = padded(query_ids, torch.ones_like(query_ids), 0)
    ekfac, gauss_newton = ekfac_and_gauss_newton(model, train, params=[layer])
    expected = gauss_newton.score(query).values
    assert torch.isfinite(expected).all() and expected.abs().amax() > 0
    torch.testing.assert_close(
        ekfac.score(query).values, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().amax())
    )


def test_ekfac_against_gauss_newton_on_a_whole_gpt2_block_measured(transformers):
    """The general case: the four layers of a block, 12 sequences of 3-5 tokens with padding, 3 queries.

    EK-FAC is then an approximation twice over (no curvature between layers; within a layer a Kronecker
    eigenbasis that is not the Gauss-Newton block's own), and the scores come out larger than Gauss-Newton's, the
    reason its units are ``"rank-only"``. Measured (scores of EK-FAC against Gauss-Newton, float64, damping 0,
    weight decay 1e-2; Pearson / Spearman / least-squares slope of EK-FAC on Gauss-Newton):

    * this test (n_embd=8, 840 parameters): 0.945 / 0.953 / 1.94; one layer alone: Pearson 0.97-0.998, slope
      0.94-1.14;
    * n_embd=16 (3,216 parameters): 0.957 / 0.859 / 2.70; one layer alone: Pearson 0.97-0.99, slope 1.03-1.22;
    * one predicted token per sequence, distinct contexts: 0.972 / 0.697 / 2.92 (n_embd=8), 0.867 / 0.520 / 2.70
      (n_embd=16); shared context (exact per layer, above), all four layers: 0.996 / 0.987 / 3.43.

    Held to what was measured, with margin: Pearson > 0.8, Spearman > 0.7, slope in (1.2, 4)."""
    model = gpt2(transformers, n_embd=8)
    ids, mask = sequences(12)
    query_ids, query_mask = sequences(3, seed=7)
    ekfac, gauss_newton = ekfac_and_gauss_newton(model, padded(ids, mask, 0))
    query = padded(query_ids, query_mask, 0)
    a, b = ekfac.score(query).values.flatten(), gauss_newton.score(query).values.flatten()
    pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    rank = lambda x: x.argsort().argsort().double()  # noqa: E731 (no ties among these scores)
    spearman = float(torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1])
    slope = float(a @ b / (b @ b))
    assert pearson > 0.8 and spearman > 0.7 and 1.2 < slope < 4, (pearson, spearman, slope)


def test_auto_takes_the_sampled_fisher_for_ekfac_on_a_language_model(transformers):
    """Above ``MAX_GGN_OUTPUTS`` outputs per sequence (positions x vocabulary) EK-FAC's exact output Hessian is
    refused, so ``curvature="auto"`` predicts and builds EK-FAC with the sampled Fisher (one backward column per
    example): with every full-model route over the time budget it takes EK-FAC on the supported layers."""
    from datatrace.curvature.auto import AutoCurvature
    from datatrace.curvature.kfac import MAX_GGN_OUTPUTS

    vocab = 80
    model = gpt2(transformers, vocab=vocab)
    g = torch.Generator().manual_seed(0)
    length = MAX_GGN_OUTPUTS // vocab + 2  # more than MAX_GGN_OUTPUTS logits per sequence
    ids = torch.randint(1, vocab, (6, length), generator=g)
    train = DictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    seen = {}

    def cost(
        name, probe
    ):  # every route but EK-FAC far over the budget; EK-FAC priced by its backward columns
        seen[name] = probe.outputs
        return 1e9 if name != "ekfac" else float(probe.outputs)

    inf = datatrace.InfluenceFunction(
        model, CausalLMTask(WD), curvature=AutoCurvature(cost_model=cost), progress=False
    ).fit(train)
    info = inf.curvature_.info
    assert info["auto_choice"] == "ekfac" and info["fisher"] == "sampled"
    assert seen["ekfac"] == 1 and seen["arnoldi"] == length * vocab
    assert "fisher='sampled'" in info["auto_reason"] and inf.params_left_out_
    scores = inf.score(DictDataset(**{k: v[:2] for k, v in train.columns.items()})).values
    assert scores.shape == (2, 6) and torch.isfinite(scores).all() and scores.abs().amax() > 0


def test_a_tied_output_layer_is_covered_through_its_own_use(transformers):
    """Oracle: the same GPT-2 with untied weights (``lm_head`` a separate copy of the embedding), scoped by hand to
    the blocks' layers and ``lm_head``, gives the same EK-FAC scores as the tied model with the default scope."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=V, n_positions=T + EXTRA)
    tied = transformers.GPT2LMHeadModel(config).double().eval()
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied_config = transformers.GPT2Config(**{**config.to_dict(), "tie_word_embeddings": False})
    untied = transformers.GPT2LMHeadModel(untied_config).double().eval()
    untied.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(tied.transformer.wte.weight)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    ids, mask = sequences(seed=3)
    train = padded(ids, mask, 0)
    query = DictDataset(**{k: v[:2] for k, v in train.columns.items()})
    args = {"curvature": EKFAC(fisher="ggn"), "progress": False}
    task = CausalLMTask(weight_decay=WD)
    default = datatrace.InfluenceFunction(tied, task, **args).fit(train)
    assert "lm_head.weight" in default.fmodel_.space.names
    assert "transformer.wte.weight" in default.params_left_out_
    assert tied.lm_head.weight is tied.transformer.wte.weight  # the user's model is left tied
    blocks = [n for n, _ in untied.named_parameters() if ".attn.c_" in n or ".mlp.c_" in n]
    by_hand = datatrace.InfluenceFunction(untied, task, params=[*blocks, "lm_head.weight"], **args).fit(train)
    torch.testing.assert_close(
        default.score(query).values, by_hand.score(query).values, rtol=1e-9, atol=1e-12
    )


def test_the_sampled_fisher_counts_one_output_per_predicted_position(transformers):
    """EK-FAC's damping='auto' keeps 75 effective directions per output; with fisher='sampled' the outputs are
    its draws: one per counted next-token position (not V per position)."""
    from datatrace.curvature.kfac import KFAC_DOF_PER_OUTPUT

    ids, mask = sequences()
    train = padded(ids, mask, EXTRA)
    task = CausalLMTask()
    outputs = torch.zeros(N, T + EXTRA, V, dtype=torch.float64)
    counts = task.distribution_counts(outputs, train.columns)
    assert counts.tolist() == (mask.sum(dim=1) - 1).tolist()  # every next token of each sequence, padding not
    assert torch.equal(task.output_counts(outputs, train.columns), counts * V)
    inf = datatrace.InfluenceFunction(
        gpt2(transformers), task, curvature=EKFAC(fisher="sampled"), progress=False
    )
    inf.fit(train)
    state = inf.curvature_.training_state
    assert state.distributions == round(float(counts.double().mean())) and not state.at_minimum
    expected = min(KFAC_DOF_PER_OUTPUT * state.distributions, inf.fmodel_.num_params / 2)
    assert inf.curvature_.info["damping_rule"] == f"dof={round(expected)}"


def test_projected_influence_takes_the_sampled_fisher_for_a_language_model_by_itself(transformers):
    """fisher='auto': a causal LM with more than 1024 outputs per sequence (positions x vocabulary) gets the sampled
    Fisher, where the exact output Hessian is refused by name."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=600, n_positions=8)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 600, (6, 8), generator=torch.Generator().manual_seed(1))
    train = DictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    args = {"dtype": torch.float64, "progress": False}
    inf = datatrace.ProjectedInfluence(model, CausalLMTask(), **args).fit(train)
    assert inf.fisher_ == "sampled" and inf.info["damping_rule"].startswith(("dof=", "at-minimum"))
    assert bool(
        torch.isfinite(inf.score(DictDataset(**{k: v[:2] for k, v in train.columns.items()})).values).all()
    )
    with pytest.raises(ValueError, match="fisher='ggn' is not allowed"):
        datatrace.ProjectedInfluence(model, CausalLMTask(), fisher="ggn", **args).fit(train)
