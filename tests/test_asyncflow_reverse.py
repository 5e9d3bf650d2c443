"""The long-tail task of the AsyncFlow benchmark: reverse a string of log-uniform random length (correct responses
from a few tokens to >= 256), graded by ``prefix_match``; the trainer's collate cuts padded responses to the longest;
``ds_ext.grpo.cli --task reverse`` (examples/grpo.py) builds it."""
import statistics

import torch

from ds_ext.grpo.rewards import prefix_match
from ds_ext.grpo.task import ReversePrompts, reverse_task
from ds_ext.grpo.trainer import collate


def test_reverse_prompts_are_long_tailed_and_deterministic():
    p = ReversePrompts(seed=3)
    lengths = [len(p.string(i)) for i in range(2000)]
    # log-uniform on [2, 256]: median sqrt(512) ~ 22.6, 1% of strings beyond ~243; 2000 draws put the sample median
    # within a few units of it and reach both ends of the range
    assert min(lengths) <= 3 and max(lengths) >= 240
    assert 16 <= statistics.median(lengths) <= 30
    rec = p.record(7)
    s = p.string(7)
    assert rec.text == f"reverse: {s}=" and rec.metadata["answer"] == s[::-1]
    assert ReversePrompts(seed=3).record(7).text == rec.text  # prompt i is a function of (seed, i)
    assert ReversePrompts(seed=4).record(7).text != rec.text


def test_prefix_match_grades_the_correct_prefix():
    assert prefix_match("", "cba", answer="cba") == 1.0
    assert prefix_match("", "cbx", answer="cba") == 2 / 3
    assert prefix_match("", "cbaxyz", answer="cba") == 0.5  # trailing garbage costs: over the longer string
    assert prefix_match("", "", answer="cba") == 0.0
    assert prefix_match("", "", answer="") == 1.0


def test_reverse_task_scores_decoded_responses_with_eos():
    task = reverse_task(max_len=64, seed=1)
    answer = task.record(5).metadata["answer"]
    ids = task.codec.encode(answer, add_special_tokens=False) + [task.eos_id]
    wrong = task.codec.encode("#" + answer[1:], add_special_tokens=False) + [task.eos_id]
    width = len(ids) + 3
    resp = torch.full((2, width), task.pad_id)
    resp[0, :len(ids)], resp[1, :len(wrong)] = torch.tensor(ids), torch.tensor(wrong)
    assert task.score(5, resp, [len(ids), len(wrong)]) == [1.0, 0.0]
    x, y = task.sft_batch([5])
    labelled = y[0][y[0] != -100].tolist()
    assert labelled == ids  # the warm start learns the reversed string and its EOS only


def test_collate_cuts_padded_responses_to_the_longest():
    width = 300  # max_new_tokens
    samples = []
    for n in (3, 17, 9):
        resp = torch.zeros(width, dtype=torch.long)
        resp[:n] = 5
        samples.append({"prompt_ids": torch.tensor([1, 2]), "response_ids": resp, "response_len": n,
                        "logprobs": torch.zeros(width), "token_versions": torch.zeros(width, dtype=torch.long),
                        "reward": 0.0, "version": 0, "prompt_index": 0})
    batch = collate([{"samples": samples[:2]}, {"samples": samples[2:]}])
    assert batch["response"].shape == (3, 17) and batch["old_logprobs"].shape == (3, 17)
    assert batch["token_versions"].shape == (3, 17)
    assert batch["mask"].sum(1).tolist() == [3, 17, 9]


def test_the_example_builds_the_reverse_task():
    from ds_ext.grpo import cli as grpo
    args = grpo.parse_args(["--deepspeed_config", "unused", "--task", "reverse", "--reverse_max_len", "32"])
    assert args.reward == "ds_ext.grpo.rewards:prefix_match"
    task = grpo.task_for(args)
    assert isinstance(task.prompts, ReversePrompts) and task.prompts.max_len == 32
    assert grpo.warm_start_path(args, task) != grpo.warm_start_path(
        grpo.parse_args(["--deepspeed_config", "unused"]), grpo.task_for(grpo.parse_args(["--deepspeed_config", "x"])))
