"""The GRPO task interface: JSONL prompts (text or chat messages + metadata), a user's ``module:function`` reward
(plain and batched), the built-in verifiers, the addition task as one instance, and bad input named clearly (exit 2
from the example before anything starts; a reward raising mid-run stops the queue instead of hanging it)."""
import json
import textwrap

import pytest
import torch

from ds_ext.grpo.rewards import RewardError, exact_match, last_number, regex
from ds_ext.grpo.task import AdditionPrompts, TaskError, addition_task, build_task

USER_REWARDS = """
    import ds_ext.grpo.rewards as r

    def contains_answer(prompt, completion, answer, bonus=0.0):
        return float(str(answer) in completion) + bonus

    @r.batched
    def group_len(prompts, completions, answer, **_):
        return [float(len(c)) for c in completions]

    def text(prompt, completion, **_):
        return "high"

    def boom(prompt, completion, **meta):
        if completion:
            raise ZeroDivisionError("user bug")
        return 0.0
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_rewards_af.py").write_text(textwrap.dedent(USER_REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_rewards_af"


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_builtin_verifiers():
    assert exact_match("p", " 42\n", answer=42) == 1.0 and exact_match("p", "42.", answer="42") == 0.0
    assert last_number("p", "3 apples, then 1,024 pears", answer="1024") == 1.0
    assert last_number("p", "x = -2.5", answer=-2.5) == 1.0 and last_number("p", "7 then 8", answer=7) == 0.0
    assert last_number("p", "no digits", answer=1) == 0.0
    assert regex("p", "so \\boxed{12}.", pattern=r"\\boxed\{12\}") == 1.0 and regex("p", "12", pattern="^1$") == 0.0


def test_jsonl_text_and_chat_prompts_with_metadata_reach_the_reward(tmp_path, user_module):
    from asyncflow_hfdir import make_tokenizer
    tok = make_tokenizer()
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 7+8?", "answer": 15, "bonus": 0.5}, "",
                                              {"messages": msgs, "answer": 5}])
    task = build_task(path, f"{user_module}:contains_answer", tok)
    assert len(task.prompts) == 2 and task.record(2).origin == f"{path}:1"  # prompt i = record i mod 2; line numbers
    assert task.record(1).text == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert task.prompt_ids(0).tolist() == tok("What is 7+8?")["input_ids"]
    answer = tok("The answer is 15", add_special_tokens=False)["input_ids"]
    resp = torch.tensor([answer + [task.eos_id], answer[:2] + [task.pad_id] * (len(answer) - 1)])
    # prompt 0: metadata answer 15 and bonus 0.5 as keyword arguments; the completion is decoded up to its EOS
    assert task.score(0, resp, [len(answer) + 1, 2]) == [1.5, 0.5]
    batched = build_task(path, f"{user_module}:group_len", tok)
    assert batched.reward.batched and batched.score(1, resp, [len(answer) + 1, 2]) == [
        float(len("The answer is 15")), float(len(tok.decode(answer[:2])))]


def test_addition_is_an_instance_of_the_interface():
    task = addition_task(seed=3)
    a, b = AdditionPrompts(seed=3).operands(5)
    assert task.record(5).metadata == {"answer": str(a + b)} and task.reward.spec.endswith(":exact_match")
    ok = task.codec.encode(str(a + b), add_special_tokens=False) + [task.eos_id]
    resp = torch.full((2, 6), task.pad_id)
    resp[0, :len(ok)] = torch.tensor(ok)
    resp[1, :2] = torch.tensor([ord("x"), task.eos_id])
    assert task.score(5, resp, [len(ok), 2]) == [1.0, 0.0]
    assert task.prompt_ids(5)[0] == 256 and task.codec.decode(task.prompt_ids(5).tolist()).endswith(f"{a}+{b}=")


@pytest.mark.parametrize("rows,reward,message", [
    ([{"answer": 1}], "ds_ext.grpo.rewards:exact_match", ":1: a record needs exactly one of 'prompt'"),
    (['{"prompt": "x",'], "ds_ext.grpo.rewards:exact_match", ":1: not valid JSON"),
    ([{"prompt": "a", "answer": 1}, {"prompt": "b"}], "ds_ext.grpo.rewards:exact_match",
     ":2: reward 'ds_ext.grpo.rewards:exact_match' needs the field(s) ['answer']"),
    ([{"prompt": "a", "pattern": "x"}], "ds_ext.grpo.rewards:regexp", "has no attribute 'regexp'"),
    ([{"prompt": "a"}], "no_such_module_af:f", "module 'no_such_module_af' does not import: ModuleNotFoundError"),
    ([{"prompt": "a"}], "exact_match", "expected 'module:function'"),
    ([{"prompt": "a"}], "USER:text", "returned 'high' (str); a reward must be a finite real number"),
    ([{"messages": [{"role": "user", "content": "hi"}], "answer": 1}], "ds_ext.grpo.rewards:exact_match",
     ":1: the record has 'messages' but the tokenizer has no chat template"),
])
def test_bad_task_input_is_named(tmp_path, user_module, rows, reward, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises((TaskError, RewardError), match=None) as info:
        build_task(path, reward.replace("USER", user_module))
    assert message in str(info.value), str(info.value)


def test_a_reward_raising_mid_run_names_the_prompt_and_stops_the_queue(tmp_path, user_module):
    """The rollout worker reports the error to the queue: the trainer's next take raises it (no hang)."""
    from ds_ext.asyncflow.config import AsyncFlowConfig
    from ds_ext.asyncflow.queue import RolloutFailed, TransferQueue
    from ds_ext.asyncflow.rollout import RolloutWorker
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(3)])
    task = build_task(path, f"{user_module}:boom")  # the probe passes: an empty completion returns 0.0
    cfg = AsyncFlowConfig(group_size=2, groups_per_step=2, max_new_tokens=3)
    queue = TransferQueue(2, 2, 1)
    tiny = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    torch.manual_seed(0)
    worker = RolloutWorker("w0", lambda: LlamaForCausalLM(tiny), task, cfg, queue)
    with pytest.raises(RewardError) as info:
        worker.produce_one(timeout=1.0)
    text = str(info.value)
    assert f"raised on prompt 0 ({path}:1): ZeroDivisionError: user bug" in text and "Traceback" in text
    with pytest.raises(RolloutFailed, match="rollout worker w0: reward .* raised on prompt 0"):
        queue.take("train", 0, 1, timeout=30)  # returns at once, not after the timeout


def _example():
    from ds_ext.grpo import cli
    return cli


@pytest.mark.parametrize("case", ["missing_prompt", "no_import", "non_number"])
def test_the_example_exits_2_before_training(tmp_path, user_module, capsys, repo_root, case):
    rows = {"missing_prompt": [{"prompt": "a", "answer": 1}, {"question": "b", "answer": 2}]}.get(
        case, [{"prompt": "a", "answer": 1}])
    reward = {"no_import": "no_such_module_af:f", "non_number": f"{user_module}:text"}.get(
        case, "ds_ext.grpo.rewards:exact_match")
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(SystemExit) as info:
        _example().main(["--deepspeed_config", str(repo_root / "configs" / "grpo_async.json"), "--prompts", path,
                         "--reward", reward, "--sft_cache", str(tmp_path / "never")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert {"missing_prompt": f"{path}:2: a record needs exactly one of 'prompt'",
            "no_import": "module 'no_such_module_af' does not import",
            "non_number": "returned 'high' (str)"}[case] in err, err
    assert not list(tmp_path.glob("never*")), "nothing is written before the checks pass"
