import pytest

from hf_ftkit.errors import BadInputError
from hf_ftkit.planner.budget import find_gpu, known_gpus, parse_budget
from hf_ftkit.units import GIB, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GiB", 24 * GIB), ("24GB", 24 * 10**9), ("80G", 80 * GIB), ("0.5 TiB", GIB * 512), ("1024", 1024)],
)
def test_sizes(text, expected):
    assert parse_budget(text).bytes == expected


@pytest.mark.parametrize(("name", "mib"), [("a100-80gb", 81920), ("H100", 81559), ("rtx_4090", 24564), ("t4", 15360)])
def test_gpu_names_come_from_the_data_file(name, mib):
    assert parse_budget(name).bytes == mib * 1024**2


def test_every_gpu_has_memory_and_throughput():
    for name in known_gpus():
        gpu = find_gpu(name)
        assert gpu["memory_mib"] > 1000 and gpu["bf16_tflops"] > 0


@pytest.mark.parametrize("text", ["24 parsecs", "-3GiB", "0GB", "abc", "h1000"])
def test_bad_budgets_are_one_sentence(text):
    with pytest.raises(BadInputError) as err:
        parse_budget(text)
    message = str(err.value)
    assert "--budget" in message and "\n" not in message


def test_unknown_gpu_suggests_a_close_name():
    with pytest.raises(BadInputError, match="did you mean 'h100'"):
        parse_budget("h1000")


def test_auto_without_cuda_explains_what_to_pass():
    import torch

    if torch.cuda.is_available():
        assert parse_budget("auto").bytes > 0
    else:
        with pytest.raises(BadInputError, match="no CUDA GPU"):
            parse_budget("auto")


def test_parse_size_rejects_zero():
    with pytest.raises(BadInputError):
        parse_size("0")
