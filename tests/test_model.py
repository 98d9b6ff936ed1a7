"""The encoder loader, the bridge (the guide's bug and the fix), standardisation, overfitting, diagnosis."""

import pytest
import torch

from conftest import tsw


def encoder_state(project_template):
    raw = torch.load(project_template["encoder"])["encoder_state_dict"]
    return {k[len("encoder."):]: v for k, v in raw.items()}


@pytest.mark.parametrize("form", ["bare", "encoder_state_dict", "model_state_dict", "prefixed"])
def test_encoder_loads_from_every_users_format(project_template, tmp_path, form):
    state = encoder_state(project_template)
    wrapped = {"bare": state, "encoder_state_dict": {"encoder_state_dict": state, "epoch": 3},
               "model_state_dict": {"model_state_dict": state},
               "prefixed": {"model_state_dict": {f"encoder.{k}": v for k, v in state.items()}}}[form]
    torch.save(wrapped, tmp_path / "enc.pt")
    encoder = tsw.load_sonar_encoder(tmp_path / "enc.pt").eval()
    assert encoder.dims == (64, 512, 512, 1024)
    reference = tsw.SentenceEncoder((64, 512, 512, 1024)).eval()
    reference.load_state_dict(state)
    x = torch.randn(3, 64)
    assert torch.equal(encoder(x), reference(x))


def test_encoder_with_missing_or_extra_keys_is_refused_by_name(project_template, tmp_path):
    state = encoder_state(project_template)
    partial = {k: v for k, v in state.items() if not k.startswith("norm.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(tsw.UserError, match=r"missing keys: \['norm.bias', 'norm.weight'\]"):
        tsw.load_sonar_encoder(tmp_path / "partial.pt")
    torch.save({**state, "head.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(tsw.UserError, match=r"unexpected keys: \['head.weight'\]"):
        tsw.load_sonar_encoder(tmp_path / "extra.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(tsw.UserError, match="no encoder weights found"):
        tsw.load_sonar_encoder(tmp_path / "other.pt")


def tiny_model(project_template, **options):
    from transformers import AutoTokenizer, T5ForConditionalGeneration
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration.from_pretrained(project_template["t5"])
    tokenizer = AutoTokenizer.from_pretrained(project_template["t5"])
    return tsw.SONARwithT5(project_template["encoder"], device="cpu", decoder=t5, tokenizer=tokenizer, **options)


def test_default_bridge_differs_across_positions_and_clips(project_template):
    model = tiny_model(project_template).eval()
    assert isinstance(model.attention_bridge, torch.nn.MultiheadAttention)
    assert model.expander.shape == (32, 128)
    base = torch.nn.functional.normalize(torch.randn(1, 1024), dim=-1)
    # Clips whose embeddings have cosine ~0.99, as the users' encoder produces.
    embeddings = torch.nn.functional.normalize(base + 0.1 * torch.randn(6, 1024) / 1024 ** 0.5, dim=-1)
    assert tsw.mean_pairwise_cosine(embeddings) > 0.98
    model.set_statistics(embeddings)
    frames = torch.randn(1, 10, model.config.frame_width).expand(6, -1, -1)    # the same frames for every clip
    tokens = model.bridge(embeddings, *model.bridge.frame_encoder(frames, torch.full((6,), 10)))
    rms = tokens.pow(2).mean().sqrt()
    assert tokens.std(dim=1).mean() / rms > 0.1      # query positions distinct
    assert tokens.std(dim=0).mean() / rms > 0.1      # clips distinct despite cosine 0.99
    # The output starts at T5's own embedding scale.
    assert model.bridge.output_scale.item() == pytest.approx(tsw.embedding_scale(model.decoder.seq2seq), rel=1e-5)


def test_standardisation_buffers_are_saved_and_restored(project_template, tmp_path):
    model = tiny_model(project_template)
    embeddings = torch.randn(20, 1024) * 3 + 1
    model.set_statistics(embeddings)
    torch.save({"model_state_dict": model.state_dict()}, tmp_path / "m.pt")
    fresh = tiny_model(project_template)
    assert not torch.allclose(fresh.bridge.embedding_mean, model.bridge.embedding_mean)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt")["model_state_dict"])
    assert torch.equal(fresh.bridge.embedding_mean, embeddings.mean(0))
    assert torch.allclose(fresh.bridge.embedding_std, embeddings.std(0, unbiased=False))


def test_whitening_brings_shared_directions_down_and_keeps_the_rest(project_template):
    """Each principal direction of eigenvalue e ends at variance (1 + s) e / (e + s mean(e)): two directions with
    a hundred times the others' variance (what every clip shares) end near the others, not a hundred times them."""
    torch.manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(16, 16))[0]
    scales = torch.tensor([10.0, 10.0] + [1.0] * 14)
    frames = (torch.randn(50_000, 16) * scales) @ rotation.T + 3.0
    whitening = tsw.whitening_matrix(frames.T.cov(correction=0))
    assert torch.allclose(whitening, whitening.T, atol=1e-6)
    variances = ((frames - frames.mean(0)) @ whitening @ rotation).var(0)
    eigenvalues = scales ** 2
    s = tsw.WHITENING_SHRINKAGE
    expected = (1 + s) * eigenvalues / (eigenvalues + s * eigenvalues.mean())
    assert torch.allclose(variances, expected, rtol=0.05)
    assert variances[:2].mean() / variances[2:].mean() < 0.2 * 100     # the shared directions' lead shrinks
    isotropic = tsw.whitening_matrix(torch.randn(50_000, 16).T.cov(correction=0))
    assert torch.allclose(isotropic, torch.eye(16), atol=0.05)          # nothing to correct: nearly the identity


def test_frame_covariance_is_the_training_frames_and_old_checkpoints_keep_their_standardisation(project_template):
    dataset = tsw.How2SignDataset(project_template["root"] / "manifests/train.tsv",
                                  project_template["root"] / "features/train")
    frames = torch.cat([dataset.frames(i) for i in range(len(dataset))]).double()
    assert torch.allclose(dataset.frame_covariance(), frames.T.cov(correction=0), atol=1e-3)
    every_third = torch.cat([dataset.frames(i) for i in range(0, len(dataset), 3)]).double() - dataset.frame_mean
    few = -(-int(dataset.lengths.sum()) // 3)                             # a third of the frames: every 3rd clip
    assert torch.allclose(dataset.frame_covariance(max_frames=few), every_third.T @ every_third / len(every_third),
                          atol=1e-3)
    torch.manual_seed(0)
    encoder, mean, std = tsw.FrameEncoder(64, 8).eval(), torch.randn(64), torch.rand(64) + 0.5
    state = {**encoder.state_dict(), "frame_mean": mean, "frame_std": std}   # saved before the whitening
    del state["frame_whitening"]
    encoder.load_state_dict(state)
    clip = frames[None, :20].float()
    standardised = tsw.FrameEncoder(64, 8).eval()
    standardised.load_state_dict({**encoder.state_dict(), "frame_mean": torch.zeros(64),
                                  "frame_whitening": torch.eye(64)})
    with torch.no_grad():
        assert torch.allclose(encoder(clip, torch.tensor([20]))[0],
                              standardised((clip - mean) / std, torch.tensor([20]))[0], atol=1e-5)


@pytest.fixture(scope="module")
def overfit(project_template):
    """A tiny model trained on 6 clips until it reproduces them (at most 400 steps)."""
    dataset = tsw.How2SignDataset(project_template["root"] / "manifests/train.tsv",
                                  project_template["root"] / "features/train")
    model = tiny_model(project_template)
    dataset.tokenize(model.tokenizer, 32)
    batch = tsw.collate_clips([dataset[i] for i in range(6)])
    model.set_statistics(tsw.encode_dataset(model, dataset))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(1, 401):
        model.train()
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 25 == 0:
            model.eval()
            if model.generate(batch, max_new_tokens=32) == batch["text"]:
                break
    model.eval()
    return model, dataset, batch, step


def test_tiny_model_overfits_a_handful_of_clips_to_distinct_correct_outputs(overfit):
    model, _, batch, steps = overfit
    predictions = model.generate(batch, max_new_tokens=32)
    assert predictions == batch["text"], f"after {steps} steps: {predictions}"
    assert len(set(predictions)) == 6


def test_collapse_diagnosis_names_the_stage(overfit):
    model, dataset, batch, _ = overfit
    healthy = model.generate(batch, max_new_tokens=32)
    references = list(batch["text"])
    diagnostics = tsw.collapse_diagnostics(model, dataset, healthy, references, max_clips=6)
    assert diagnostics["distinct_share"] == 1.0
    assert tsw.diagnose_collapse(diagnostics) is None                   # quiet when healthy
    # The same healthy bridge with collapsed predictions: the decoder is to blame.
    collapsed = tsw.collapse_diagnostics(model, dataset, [healthy[0]] * 6, references, max_clips=6)
    assert "DECODER" in tsw.diagnose_collapse(collapsed)
    # An encoder that maps every clip to the same vector.
    dataset.sentence_embeddings = torch.nn.functional.normalize(torch.ones(len(dataset), 1024), dim=-1)
    stats = tsw.collapse_diagnostics(model, dataset, ["same"] * 6, references, max_clips=6)
    assert stats["encoder_cosine"] == pytest.approx(1.0)
    assert "ENCODER" in tsw.diagnose_collapse(stats)
    dataset.sentence_embeddings = None


def test_evaluation_decoding_is_deterministic(overfit):
    model, dataset, _, _ = overfit
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False)
    first = tsw.evaluate_model(model, loader, "cpu")
    second = tsw.evaluate_model(model, loader, "cpu")
    assert first[2] == second[2] and first[0] == second[0]
    assert len(first[2]) == len(dataset)


def test_beam_search_keeps_cross_attention_in_place_and_decodes_the_same(overfit):
    """Beams are reordered within a clip only and share its cross-attention keys/values: leaving those
    in place (our cache) decodes exactly what the library's own cache does, which moves them every step."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    model, dataset, _, _ = overfit
    cache = tsw.beam_search_cache()
    cross, own = torch.randn(4, 2, 3, 8), torch.randn(4, 2, 1, 8)            # (beams, heads, tokens, dim)
    cache.cross_attention_cache.update(cross, cross + 1, 0)
    cache.self_attention_cache.update(own, own + 1, 0)
    cache.reorder_cache(torch.tensor([1, 1, 0, 3]))
    assert torch.equal(cache.cross_attention_cache.layers[0].keys, cross)
    assert torch.equal(cache.self_attention_cache.layers[0].keys, own[[1, 1, 0, 3]])
    batch = tsw.collate_clips([{k: v for k, v in dataset[i].items() if k != "labels"} for i in range(12)])
    ours = model.generate(batch, num_beams=4, max_new_tokens=32, length_penalty=1.5)
    library = model.generate(batch, num_beams=4, max_new_tokens=32, length_penalty=1.5,
                             **{tsw.cache_kwarg(): EncoderDecoderCache(DynamicCache(), DynamicCache())})
    assert ours == library and len(set(ours)) >= 6                       # whole sentences, not one repeated


def test_training_batches_group_clips_of_similar_length():
    """Every clip once per epoch, in batches of similar length (less frame padding), in an order that
    is fixed by seed and epoch (resume) but changes between epochs, and split across processes."""
    lengths = torch.randint(60, 301, (1000,), generator=torch.Generator().manual_seed(0))
    one = tsw.World(device=torch.device("cpu"))

    def padded(batches):
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    grouped = tsw.epoch_batches(len(lengths), 16, 3, 7, one, lengths)
    order = torch.randperm(1000).tolist()
    shuffled = [order[i: i + 16] for i in range(0, 1000, 16)]                   # batches not grouped by length
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert padded(grouped) < 0.75 * padded(shuffled)             # random batches pad to ~the longest clip
    assert grouped == tsw.epoch_batches(len(lengths), 16, 3, 7, one, lengths)
    assert grouped != tsw.epoch_batches(len(lengths), 16, 4, 7, one, lengths)
    # the batches' order is shuffled, not longest first
    assert [int(lengths[b].max()) for b in grouped] != sorted((int(lengths[b].max()) for b in grouped), reverse=True)
    ranks = [tsw.epoch_batches(len(lengths), 16, 3, 7, tsw.World(rank=r, size=2, device=torch.device("cpu")),
                               lengths) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    assert sorted(i for batches in ranks for b in batches for i in b) == list(range(1000))
