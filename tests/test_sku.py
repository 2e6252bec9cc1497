"""SKU detection (``autotune.lookup.sku``): the table's rules, fallback ids, the capability of an id, per-device
caching."""

from __future__ import annotations

import pytest
import torch

from autotune.lookup import sku

GIB = 1 << 30

SKU_CASES = [
    (sku.DeviceProps("NVIDIA H100 80GB HBM3", 9, 0, 132, 79 * GIB), "h100-sxm"),
    (sku.DeviceProps("NVIDIA H100 SXM5 80GB", 9, 0, 132, 80 * GIB), "h100-sxm"),
    (sku.DeviceProps("NVIDIA H100 PCIe", 9, 0, 114, 80 * GIB), "h100-pcie"),
    (sku.DeviceProps("NVIDIA H800", 9, 0, 132, 80 * GIB), "h800"),
    (sku.DeviceProps("NVIDIA H200", 9, 0, 132, 140 * GIB), "h200"),
    (sku.DeviceProps("NVIDIA H20", 9, 0, 78, 95 * GIB), "h20"),
    (sku.DeviceProps("NVIDIA GH200 480GB", 9, 0, 132, 95 * GIB), "gh200"),
    # Not in the table: fall back to sm<cc>-<sanitised name>.
    (sku.DeviceProps("NVIDIA Foo", 9, 0, 100, 80 * GIB), "sm90-nvidia-foo"),
    (sku.DeviceProps("NVIDIA H100 NVL", 9, 0, 132, 94 * GIB), "sm90-nvidia-h100-nvl"),
    (sku.DeviceProps("NVIDIA H200 NVL", 9, 0, 132, 140 * GIB), "sm90-nvidia-h200-nvl"),
    # A MIG slice of an H100 has the name stem but fewer SMs and less memory: never the full card's configs.
    (
        sku.DeviceProps("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 9, 0, 16, 10 * GIB),
        "sm90-nvidia-h100-80gb-hbm3-mig-1g-10gb",
    ),
    # Ampere, Ada and Blackwell boards, as the driver names them.
    (sku.DeviceProps("NVIDIA A100-SXM4-40GB", 8, 0, 108, 39 * GIB), "a100-sxm-40gb"),
    (sku.DeviceProps("NVIDIA A100-SXM4-80GB", 8, 0, 108, 79 * GIB), "a100-sxm-80gb"),
    (sku.DeviceProps("NVIDIA A100-PCIE-40GB", 8, 0, 108, 39 * GIB), "a100-pcie-40gb"),
    (sku.DeviceProps("NVIDIA A100 80GB PCIe", 8, 0, 108, 79 * GIB), "a100-pcie-80gb"),
    (sku.DeviceProps("NVIDIA A10", 8, 6, 72, 22 * GIB), "a10"),
    (sku.DeviceProps("NVIDIA L4", 8, 9, 58, 22 * GIB), "l4"),
    (sku.DeviceProps("NVIDIA L40S", 8, 9, 142, 44 * GIB), "l40s"),
    (sku.DeviceProps("NVIDIA GeForce RTX 4090", 8, 9, 128, 24 * GIB), "rtx4090"),
    (sku.DeviceProps("NVIDIA GeForce RTX 5090", 12, 0, 170, 32 * GIB), "rtx5090"),
    (sku.DeviceProps("NVIDIA B200", 10, 0, 148, 179 * GIB), "b200"),
    (sku.DeviceProps("NVIDIA GB200", 10, 0, 152, 185 * GIB), "gb200"),
    (sku.DeviceProps("NVIDIA B300 SXM6 AC", 10, 3, 148, 268 * GIB), "b300"),
    # Near misses: another board of the same name stem, a cut-down variant, a MIG slice.
    (sku.DeviceProps("NVIDIA L40", 8, 9, 142, 44 * GIB), "sm89-nvidia-l40"),
    (sku.DeviceProps("NVIDIA A10G", 8, 6, 80, 22 * GIB), "sm86-nvidia-a10g"),
    (sku.DeviceProps("NVIDIA GeForce RTX 4090 D", 8, 9, 114, 24 * GIB), "sm89-nvidia-geforce-rtx-4090-d"),
    (sku.DeviceProps("NVIDIA A100-SXM4-80GB MIG 1g.10gb", 8, 0, 14, 9 * GIB), "sm80-nvidia-a100-sxm4-80gb-mig-1g-10gb"),
    (sku.DeviceProps("NVIDIA RTX PRO 6000 Blackwell", 12, 0, 188, 95 * GIB), "sm120-nvidia-rtx-pro-6000-blackwell"),
]


@pytest.mark.parametrize(("props", "expected"), SKU_CASES, ids=[c[1] + ":" + c[0].name for c in SKU_CASES])
def test_sku_table(props: sku.DeviceProps, expected: str) -> None:
    assert sku.sku_from_props(props) == expected
    assert sku.is_valid_sku(expected)


def test_sku_rules_are_mutually_exclusive() -> None:
    for props, expected in SKU_CASES:
        matching = [rule.sku for rule in sku.SKU_TABLE if rule.matches(props)]
        assert matching == ([expected] if expected in sku.KNOWN_SKUS else []), props


def test_capability_for_sku() -> None:
    """Every known id, a family of ids and a fallback id name a compute capability (what the tuner asks
    ``dsa.hardware.target_for_capability`` about); anything else is an error."""
    for rule in sku.SKU_TABLE:
        assert sku.capability_for_sku(rule.sku) == rule.capability
    assert sku.capability_for_sku("a100") == (8, 0)  # a100-sxm-40gb, a100-sxm-80gb, a100-pcie-40gb, a100-pcie-80gb
    assert sku.capability_for_sku("sm90-nvidia-foo") == (9, 0)
    assert sku.capability_for_sku("sm86-nvidia-a10g") == (8, 6)
    assert sku.capability_for_sku("sm100-nvidia-b200") == (10, 0)
    assert sku.capability_for_sku("sm120-nvidia-rtx-pro-6000") == (12, 0)
    for bad in ("not-a-sku", "h1", "a"):
        with pytest.raises(ValueError, match="unknown SKU id"):
            sku.capability_for_sku(bad)
    assert not sku.is_valid_sku("../etc")
    assert not sku.is_valid_sku("H100")


def test_current_sku_is_cached_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_props(index: int) -> sku.DeviceProps:
        calls.append(index)
        return SKU_CASES[0][0] if index == 0 else SKU_CASES[4][0]

    monkeypatch.setattr(sku, "props_of", fake_props)
    monkeypatch.setattr(sku, "_cache", {})
    for _ in range(3):
        assert sku.current_sku(torch.device("cuda", 0)) == "h100-sxm"
        assert sku.current_sku(1) == "h200"
    assert calls == [0, 1]
    with pytest.raises(ValueError):
        sku.current_sku(torch.device("cpu"))
