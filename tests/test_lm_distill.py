"""`embedder distill generate` -> `rerank` -> training, with a tiny random Qwen3 LM; resumable after SIGKILL.

The LM is transformers' own Qwen3ForCausalLM at a tiny size with random weights
and a byte-level BPE tokenizer trained here on the stdlib passages: its text is
noise, but every step of the pipeline runs on it as on a real checkpoint.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from embedder import cli
from embedder.data import pipeline
from embedder.lm import jobs

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

NUM_PASSAGES = 10
SHARD_SIZE = 2  # 5 shards: room to kill a run between two of them
PASSAGE_CHARS = 200  # short passages keep the embedder's and the LM's shapes small
PROMPT = "Passage: def f(path): return open(path).read()\nTask: find code\nQuery: read a file\n\nPassage: {title}{text}\nTask:"
GIN = ["--gin.GenerateConfig.max_passage_tokens=40", "--gin.GenerateConfig.temperature=1.0"]


def _generate_flags(lm_dir, passages, prompt, output):
    return [
        "distill",
        "generate",
        f"--lm={lm_dir}",
        f"--passages={passages}",
        f"--prompt_file={prompt}",
        f"--output={output}",
        "--max_new_tokens=10",
        "--seed=7",
        f"--shard_size={SHARD_SIZE}",
        "--max_prompt_len=256",
        *GIN,
    ]


@pytest.fixture(scope="module")
def inputs(stdlib_splits, tmp_path_factory):
    """(LM folder, passages.jsonl, prompt file): a tiny random Qwen3 with a BPE tokenizer of the passages."""
    root = tmp_path_factory.mktemp("distill")
    pairs = stdlib_splits["train"][:NUM_PASSAGES]
    passages = root / "passages.jsonl"
    passages.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "title": f"f{i}", "text": p.positive[:PASSAGE_CHARS]}) + "\n"
            for i, p in enumerate(pairs)
        )
    )
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([p.positive for p in stdlib_splits["train"][:300]] + [PROMPT], trainer)
    lm_dir = root / "lm"
    config = transformers.Qwen3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    import torch

    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(lm_dir)
    tok.save(str(lm_dir / "tokenizer.json"))
    prompt = root / "prompt.txt"
    prompt.write_text(PROMPT)
    return str(lm_dir), str(passages), str(prompt)


@pytest.fixture(scope="module")
def generated(inputs, tmp_path_factory):
    """The uninterrupted `distill generate` output folder (in process)."""
    lm_dir, passages, prompt = inputs
    output = tmp_path_factory.mktemp("gen") / "out"
    assert cli.main(_generate_flags(lm_dir, passages, prompt, output)) == 0
    return output


def test_the_packaged_prompt_follows_gecko_s_few_shot_structure():
    prompt = jobs.read_prompt(None)
    assert prompt.count("Passage:") == 4 and prompt.count("Query:") == 3
    assert prompt.rstrip().endswith("Passage: {title}{text}\nTask:")
    filled = jobs.fill_prompt(prompt, jobs.Passage("p1", "def f(): pass", "f"))
    assert filled.rstrip().endswith("Passage: f: def f(): pass\nTask:")


def _files(folder):
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, names in os.walk(folder)
        for f in names
    }


@pytest.mark.slow
def test_generate_writes_a_task_and_query_per_passage_deterministically(inputs, generated, tmp_path):
    lm_dir, passages, prompt = inputs
    rows = jobs.read_output(str(generated))
    assert [r["seed_id"] for r in rows] == [f"p{i}" for i in range(NUM_PASSAGES)]
    assert sum(bool(r["query"]) for r in rows) >= NUM_PASSAGES // 2
    assert all("\n" not in r["task"] + r["query"] for r in rows)
    manifest = jobs.read_manifest(str(generated))
    assert manifest["complete"] and manifest["num_shards"] == NUM_PASSAGES // SHARD_SIZE
    # Same seed: the same bytes; another seed: other queries.
    again = tmp_path / "again"
    assert cli.main(_generate_flags(lm_dir, passages, prompt, again)) == 0
    assert _files(again) == _files(generated)
    other = tmp_path / "other"
    assert cli.main([*_generate_flags(lm_dir, passages, prompt, other), "--seed=8"]) == 0
    assert [r["query"] for r in jobs.read_output(str(other))] != [r["query"] for r in rows]


@pytest.mark.slow
def test_rerank_output_trains_an_embedder(inputs, generated, tmp_path, train_tiny):
    lm_dir, passages, _ = inputs
    train_dir = tmp_path / "train"
    flags = [
        "distill",
        "rerank",
        f"--lm={lm_dir}",
        f"--model={cli.MINILM_NAME}",
        f"--queries={generated}",
        f"--corpus={passages}",
        f"--output={train_dir}",
        "--top_n=3",
        "--shard_size=4",
        "--max_prompt_len=256",
        "--gin.RerankConfig.max_passage_tokens=40",
        "--gin.RerankConfig.negative_rank_end=3",
    ]
    assert cli.main(flags) == 0
    queries = [r for r in jobs.read_output(str(generated)) if r["query"]]
    details = jobs.read_output(str(train_dir), details=True)
    examples = jobs.read_output(str(train_dir))
    assert len(examples) == len(details) == len(queries)
    by_id = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(passages)}
    for example, detail, query in zip(examples, details, queries, strict=True):
        assert example["query"] == query["query"] == detail["query"]
        ranked = sorted(detail["candidates"], key=lambda c: c["rank"])
        assert example["positive"] == by_id[ranked[0]["id"]] == by_id[detail["positive_id"]]
        assert detail["relabelled"] == (detail["positive_id"] != query["seed_id"])
        assert query["seed_id"] in [c["id"] for c in detail["candidates"]]
        window = [c["id"] for c in ranked[1:3] if c["id"] != query["seed_id"]][:1]
        assert detail["negative_ids"] == window
        assert example.get("negatives", []) == [by_id[i] for i in window]
        relevance = {c["id"]: c["relevance"] for c in detail["candidates"]}
        assert example["scores"] == [relevance[i] for i in [detail["positive_id"], *window]]
        for c in detail["candidates"]:
            assert c["rrf"] == pytest.approx(
                1 / (60 + c["query_likelihood_rank"]) + 1 / (60 + c["relevance_rank"])
            )
    # The shards are TRAIN_FILES as they are.
    files = jobs.shard_files(str(train_dir))
    data = pipeline.DataConfig(train_files=files, batch_size=4, query_len=16, doc_len=32, num_negatives=1)
    result = train_tiny(tmp_path / "run", None, steps=2, data=data)
    assert result.step == 2


@pytest.mark.slow
def test_a_job_with_other_settings_is_refused_in_the_same_folder(inputs, generated, capsys):
    lm_dir, passages, prompt = inputs
    assert cli.main([*_generate_flags(lm_dir, passages, prompt, generated), "--seed=9"]) == 2
    assert "another job" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.subprocess
def test_generate_killed_with_sigkill_resumes_to_the_uninterrupted_output(inputs, generated, tmp_path):
    from tests.training_helpers import REPO, wait_for

    lm_dir, passages, prompt = inputs
    output = tmp_path / "out"
    cmd = [sys.executable, "-m", "embedder", *_generate_flags(lm_dir, passages, prompt, output)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(jobs.finished_shards(str(output))) >= 1, proc, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not jobs.read_manifest(str(output))["complete"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "row/s" in proc.stderr  # the progress bar
    assert _files(output) == _files(generated)


@pytest.mark.slow
def test_filter_keeps_the_pairs_transformers_scores_most_relevant(inputs, stdlib_splits, tmp_path):
    import numpy as np
    import torch

    from embedder.data import jsonl
    from embedder.lm import rerank

    lm_dir, _, _ = inputs
    pairs = [p for p in stdlib_splits["train"] if len(p.query) < 120][:6]
    path = tmp_path / "pairs.jsonl"
    jsonl.write_jsonl(path, pairs)
    output = tmp_path / "filtered"
    flags = [
        "distill",
        "filter",
        f"--lm={lm_dir}",
        f"--input={path}",
        f"--output={output}",
        "--keep_fraction=0.5",
        f"--model={cli.MINILM_NAME}",  # and mine a hard negative for each kept pair
        "--top_n=3",
        "--shard_size=4",
        "--max_prompt_len=256",
        "--gin.RerankConfig.max_passage_tokens=40",
    ]
    assert cli.main(flags) == 0
    # The reference: transformers' model on the same prompts, one at a time.
    tok = tokenizers.Tokenizer.from_file(os.path.join(lm_dir, "tokenizer.json"))
    model = transformers.Qwen3ForCausalLM.from_pretrained(lm_dir).eval()
    config = rerank.RerankConfig(max_passage_tokens=40)
    yes, no = tok.encode(config.yes).ids[0], tok.encode(config.no).ids[0]
    relevance = []
    for pair in pairs:
        text = (
            tok.decode(tok.encode(pair.positive).ids[:40])
            if len(tok.encode(pair.positive).ids) >= 40
            else pair.positive
        )
        ids = tok.encode(rerank.relevance_prompt(config, pair.query, pair.title, text)).ids
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1).numpy()
        relevance.append(logp[yes] - logp[no])
    scored = jobs.read_output(str(output / "scores"))
    np.testing.assert_allclose([row["relevance"] for row in scored], relevance, atol=1e-4)
    best = sorted(np.argsort(-np.asarray(relevance))[:3])
    kept = jobs.read_output(str(output))
    assert [(k["query"], k["positive"]) for k in kept] == [(pairs[i].query, pairs[i].positive) for i in best]
    assert jobs.read_manifest(str(output))["kept"] == 3
    # The mined negative: the first of fused positions [1, 10) that is not the pair's own positive.
    corpus, own = jobs.positives_corpus(pairs)
    for example, i in zip(kept, best, strict=True):
        ranked = sorted(scored[i]["candidates"], key=lambda c: c["rank"])
        assert str(own[i]) in [c["id"] for c in ranked]
        window = [c["id"] for c in ranked[1:10] if c["id"] != str(own[i])][:1]
        assert example["negatives"] == [corpus[int(c)].text for c in window]
        assert pairs[i].positive not in example["negatives"]


def test_shards_split_over_processes_cover_every_row_once():
    plans = [jobs.ShardPlan(num_rows=11, shard_size=3, process_index=p, process_count=2) for p in range(2)]
    assert [plan.mine() for plan in plans] == [[0, 2], [1, 3]]
    rows = sorted(r for plan in plans for shard in plan.mine() for r in plan.rows(shard))
    assert rows == list(range(11))
    assert jobs.shard_name(3, 4) == "shard-00003-of-00004.jsonl"


def test_a_crash_mid_job_resumes_without_losing_or_repeating_a_row(tmp_path):
    def work(rows, start):
        return [{"query": f"q{start + i}", "positive": r} for i, r in enumerate(rows)], None

    def crashing(rows, start):
        if start >= 4:
            raise KeyboardInterrupt  # the process stops inside the third shard
        return work(rows, start)

    rows = [f"passage {i}" for i in range(7)]
    job = {"action": "test"}
    with pytest.raises(KeyboardInterrupt):
        jobs.run_sharded(str(tmp_path / "a"), rows, crashing, job, 2, "test")
    assert not jobs.read_manifest(str(tmp_path / "a"))["complete"]
    assert len(jobs.read_manifest(str(tmp_path / "a"))["finished"]) == 2
    jobs.run_sharded(str(tmp_path / "a"), rows, work, job, 2, "test")
    jobs.run_sharded(str(tmp_path / "b"), rows, work, job, 2, "test")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert [r["query"] for r in jobs.read_output(str(tmp_path / "a"))] == [f"q{i}" for i in range(7)]


@pytest.mark.slow
def test_an_llm_family_checkpoint_runs_as_the_lm(inputs, tmp_path):
    import numpy as np
    import torch

    from embedder import checkpointing
    from embedder.formats import hf_llm
    from embedder.lm import model as lm_model
    from embedder.models import dual_encoder, spec

    lm_dir, _, _ = inputs
    config = hf_llm.config_from_hf(lm_dir)
    meta = checkpointing.CheckpointMeta(
        model_config=spec.describe_module(dual_encoder.DualEncoder(config)), vocab_dir=lm_dir
    )
    run = str(tmp_path / "run")
    checkpointing.save_model_params(run, 3, {"encoder": hf_llm.load_llm_params(lm_dir, config)}, meta)
    lm = lm_model.load(run)
    assert lm.config.tied and lm.encode("def read(path):") == lm_model.load(lm_dir).encode("def read(path):")
    ids = lm.encode("def read(path):\n    return open(path).read()")
    tokens, mask = np.asarray([ids], np.int32), np.ones((1, len(ids)), bool)
    got = np.asarray(lm_model.forward(lm.module, lm.params, tokens, mask))
    with torch.no_grad():
        want = transformers.Qwen3ForCausalLM.from_pretrained(lm_dir)(input_ids=torch.tensor([ids])).logits
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
