"""MegatronRunner drives megatron features through the Feature contract: phase order for start and the step hook,
reverse order for close, refusal of an object that is not a Feature. In process, no megatron-core import."""
import pytest

from ds_ext.contract import FeatureBase, Phase
from ds_ext.megatron.runner import MegatronRunner


class Probe(FeatureBase):
    def __init__(self, name, phase, log):
        self.name, self.phase, self.log = name, phase, log

    def start(self, engine):
        self.log.append(("start", self.name))

    def after_optimizer_step(self, engine):
        self.log.append(("step", self.name, engine.steps))

    def metrics(self):
        return {"x": 1.0}

    def close(self):
        self.log.append(("close", self.name))


def test_runner_runs_hooks_in_phase_order_and_closes_in_reverse():
    log = []
    journal, noloco = Probe("recovery", Phase.JOURNAL, log), Probe("noloco", Phase.STEP, log)
    runner = MegatronRunner([journal, None, noloco])  # given out of order; None = a feature that is off
    assert runner.start() == 0  # no MegatronJournal among them: nothing resumed
    runner.after_step()
    runner.after_step()
    runner.close()
    assert log == [("start", "noloco"), ("start", "recovery"), ("step", "noloco", 1), ("step", "recovery", 1),
                   ("step", "noloco", 2), ("step", "recovery", 2), ("close", "recovery"), ("close", "noloco")]
    assert runner.metrics() == {"noloco/x": 1.0, "recovery/x": 1.0}
    assert runner.feature(Probe) is noloco


def test_runner_refuses_what_is_not_a_feature():
    with pytest.raises(TypeError, match="do not satisfy ds_ext.contract.Feature"):
        MegatronRunner([object()])
