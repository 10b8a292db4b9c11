import pytest

from specontext_compiler.config import CompileConfig, parse_budget, validate_token_budget


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GB", 24 * 10**9),
        ("24 GB", 24 * 10**9),
        ("24GiB", 24 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("80gb", 80 * 10**9),
        (" 2 TiB ", 2 * 2**40),
        (123456, 123456),
    ],
)
def test_budget_accepted(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["-1GB", "abc", "0", "24XB", "", "GB", "1e400GB", 0, -5, "5 PB", "9999999TB"])
def test_budget_rejected_with_value_error(bad):
    with pytest.raises(ValueError) as info:
        parse_budget(bad)
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)


@pytest.mark.parametrize("bad", [None, 1.5, True, [24], b"24GB"])
def test_budget_wrong_type(bad):
    with pytest.raises(TypeError, match="budget must be"):
        parse_budget(bad)


@pytest.mark.parametrize("good", [None, 1, 2048, 0.5, 1.0, 1e-3])
def test_token_budget_accepted(good):
    assert validate_token_budget(good) == good


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, -0.1, float("nan")])
def test_token_budget_out_of_range(bad):
    with pytest.raises(ValueError, match="token_budget"):
        validate_token_budget(bad)


@pytest.mark.parametrize("bad", ["2048", True, [1]])
def test_token_budget_wrong_type(bad):
    with pytest.raises(TypeError, match="token_budget"):
        validate_token_budget(bad)


def test_unknown_option_and_bad_prefill_chunk():
    with pytest.raises(TypeError, match="unknown option"):
        CompileConfig.from_arguments("1GB", offload_everything=True)
    with pytest.raises(ValueError, match="prefill_chunk"):
        CompileConfig.from_arguments("1GB", prefill_chunk=0)


@pytest.mark.parametrize("good", [0.0, 0.05, 2.5])
def test_sticky_margin_accepted(good):
    assert CompileConfig.from_arguments("1GB", sticky_margin=good).sticky_margin == good


@pytest.mark.parametrize("bad, error", [(-0.5, ValueError), (float("inf"), ValueError), (float("nan"), ValueError),
                                        (-0.0 - 1e-9, ValueError), (0, TypeError), (True, TypeError), (None, TypeError)])
def test_sticky_margin_refused(bad, error):
    with pytest.raises(error, match="sticky_margin must be a finite float >= 0.0"):
        CompileConfig.from_arguments("1GB", sticky_margin=bad)
