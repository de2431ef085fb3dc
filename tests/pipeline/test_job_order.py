"""The order a batch starts its jobs in: heaviest model first in each round, never two jobs of one model at once
while another model's job could run instead."""
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from edgesmith.pipeline.batch_job import warm_up
from edgesmith.pipeline.job_order import JobQueue, model_weight, model_weights, start_order
from edgesmith.pipeline.matrix import Job

SMALL = {"name": "mnist_cnn"}
LARGE = {"name": "resnet18", "kwargs": {"num_classes": 10, "in_chans": 1, "image_size": 28}}
FACTORY = {"factory": "my_models.py:build"}


def _jobs(models: dict[str, dict], recipes=("int8", "pruned")) -> list[Job]:
    """Recipe by recipe, each over every model: the matrix's order."""
    return [Job(f"{label}__{recipe}", label, recipe, {"model": section}, ".")
            for recipe in recipes for label, section in models.items()]


def test_a_larger_model_or_input_weighs_more_and_a_factory_is_not_run():
    small, large = model_weight(SMALL), model_weight(LARGE)
    assert 0 < small < large < math.inf
    assert model_weight({**LARGE, "kwargs": {**LARGE["kwargs"], "image_size": 56}}) > 2 * large
    assert model_weight({"name": "mnist_cnn", "inputs": [{"name": "x", "shape": [1, 1, 56, 56]}]}) > 2 * small
    assert model_weight(FACTORY) == math.inf


def test_a_new_pool_worker_weighs_the_jobs_as_the_driver_would():
    """The local pool takes its order from its first worker's warm-up: a fresh spawned process, torch's meta ops
    and all, must agree with the driver's own estimate."""
    jobs = _jobs({"small": SMALL, "large": LARGE, "mine": FACTORY})
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        from_worker = pool.submit(warm_up, jobs).result()
    assert from_worker == model_weights(jobs) and set(from_worker) == {"small", "large", "mine"}
    assert [j.label for j in JobQueue(jobs, from_worker).queued] == [j.label for j in start_order(jobs)]


def test_each_round_starts_with_its_heaviest_model():
    jobs = _jobs({"small": SMALL, "large": LARGE, "mine": FACTORY})
    assert [j.label for j in start_order(jobs)] == ["mine__int8", "large__int8", "small__int8",
                                                    "mine__pruned", "large__pruned", "small__pruned"]


def test_a_model_with_a_job_running_waits_while_another_models_job_can_start():
    queue = JobQueue(_jobs({"large": LARGE, "small": SMALL}))
    first, second = queue.take(), queue.take()
    assert (first.label, second.label) == ("large__int8", "small__int8")
    queue.done(second)                       # the small model finished first: the large one still trains
    assert queue.take().label == "small__pruned"
    assert queue.take().label == "large__pruned"   # every model runs a job: the first queued goes anyway
    assert not queue


def test_a_job_handed_back_goes_first():
    queue = JobQueue(_jobs({"large": LARGE, "small": SMALL}, recipes=("int8",)))
    job = queue.take()
    queue.retry(job)
    assert queue.take() is job
