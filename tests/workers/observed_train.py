"""``examples/train.py`` run as it is (its ``main()``, the command line unchanged), observed: the loss of every
training step as ``Trainer.step()`` returned it, every eval loss, and the input shape ``[B, L, C]`` of every layer
call that ran StreamBP's sequence-sharded (Ulysses) runner. As a script (what ``ds-ext`` launches) each rank writes
them to ``$OBSERVE_DIR/rank<R>.json``; :func:`observed_main` returns them (a test's own ranks)."""
import importlib.util
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def observed_main(argv=None) -> dict:
    from ds_ext.streambp import ulysses
    spec = importlib.util.spec_from_file_location("train_example", ROOT / "examples" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    seen = {"losses": [], "evals": [], "shapes": []}
    own_call, own_step, own_eval = ulysses.UlyssesStreaming.__call__, train.Trainer.step, train.Trainer.eval_loss

    def observed_call(self, call, *args):
        seen["shapes"].append(list(call.x.shape))
        return own_call(self, call, *args)

    def observed_step(self):
        seen["losses"].append(own_step(self))
        return seen["losses"][-1]

    def observed_eval(self):
        seen["evals"].append(own_eval(self))
        return seen["evals"][-1]

    ulysses.UlyssesStreaming.__call__ = observed_call
    train.Trainer.step, train.Trainer.eval_loss = observed_step, observed_eval
    try:
        train.main(argv)
    finally:
        ulysses.UlyssesStreaming.__call__ = own_call
    return seen


if __name__ == "__main__":
    observed = observed_main()
    rank = int(os.environ.get("RANK", "0"))
    Path(os.environ["OBSERVE_DIR"], f"rank{rank}.json").write_text(json.dumps(observed))
