"""`tunesmith launch ranktable`: HCCL rank tables in the format of guide 002 (MindFormers hccl_tools.py /
merge_hccl.py), for one server and merged for two."""

from __future__ import annotations

import json

import pytest

from tunesmith.cli import main
from tunesmith.errors import ConfigError
from tunesmith.launch.ranktable import (
    build_rank_table,
    default_name,
    dump_rank_table,
    make_server,
    merge_rank_tables,
    parse_device_ids,
    parse_hccn_conf,
    parse_server,
)

# Guide 002, "RANK_TABLE_FILE 单机 8 卡参考样例", with its placeholder server_id xx.xx.xx.xx filled in.
GUIDE_ONE_SERVER = {
    "version": "1.0",
    "server_count": "1",
    "server_list": [
        {
            "server_id": "10.0.0.1",
            "device": [
                {"device_id": "0", "device_ip": "192.1.27.6", "rank_id": "0"},
                {"device_id": "1", "device_ip": "192.2.27.6", "rank_id": "1"},
                {"device_id": "2", "device_ip": "192.3.27.6", "rank_id": "2"},
                {"device_id": "3", "device_ip": "192.4.27.6", "rank_id": "3"},
                {"device_id": "4", "device_ip": "192.1.27.7", "rank_id": "4"},
                {"device_id": "5", "device_ip": "192.2.27.7", "rank_id": "5"},
                {"device_id": "6", "device_ip": "192.3.27.7", "rank_id": "6"},
                {"device_id": "7", "device_ip": "192.4.27.7", "rank_id": "7"}],
            "host_nic_ip": "reserve"
        }
    ],
    "status": "completed"
}
GUIDE_ONE_SERVER_IPS = [d["device_ip"] for d in GUIDE_ONE_SERVER["server_list"][0]["device"]]

# Guide 002, "RANK_TABLE_FILE 双机 16 卡参考样例" (its two server_ids, both xx.xx.xx.xx there, filled in).
GUIDE_TWO_SERVERS = {
    "version": "1.0",
    "server_count": "2",
    "server_list": [
        {
            "server_id": "10.0.0.1",
            "device": [
                {"device_id": "0", "device_ip": "192.168.0.0", "rank_id": "0"},
                {"device_id": "1", "device_ip": "192.168.1.0", "rank_id": "1"},
                {"device_id": "2", "device_ip": "192.168.2.0", "rank_id": "2"},
                {"device_id": "3", "device_ip": "192.168.3.0", "rank_id": "3"},
                {"device_id": "4", "device_ip": "192.168.0.1", "rank_id": "4"},
                {"device_id": "5", "device_ip": "192.168.1.1", "rank_id": "5"},
                {"device_id": "6", "device_ip": "192.168.2.1", "rank_id": "6"},
                {"device_id": "7", "device_ip": "192.168.3.1", "rank_id": "7"},
            ],
            "host_nic_ip": "reserve",
        },
        {
            "server_id": "10.0.0.2",
            "device": [
                {"device_id": "0", "device_ip": "192.168.0.1", "rank_id": "8"},
                {"device_id": "1", "device_ip": "192.168.1.1", "rank_id": "9"},
                {"device_id": "2", "device_ip": "192.168.2.1", "rank_id": "10"},
                {"device_id": "3", "device_ip": "192.168.3.1", "rank_id": "11"},
                {"device_id": "4", "device_ip": "192.168.0.2", "rank_id": "12"},
                {"device_id": "5", "device_ip": "192.168.1.2", "rank_id": "13"},
                {"device_id": "6", "device_ip": "192.168.2.2", "rank_id": "14"},
                {"device_id": "7", "device_ip": "192.168.3.2", "rank_id": "15"},
            ],
            "host_nic_ip": "reserve",
        },
    ],
    "status": "completed",
}
SERVER_IPS = {
    s["server_id"]: [d["device_ip"] for d in s["device"]] for s in GUIDE_TWO_SERVERS["server_list"]
}


def _same_as_guide(table: dict, guide: dict) -> None:
    """Equal values, equal key order at every level (json.dumps keeps insertion order), strings only."""
    assert table == guide
    assert json.dumps(table) == json.dumps(guide)

    def strings(node) -> None:
        if isinstance(node, dict):
            for value in node.values():
                strings(value)
        elif isinstance(node, list):
            for value in node:
                strings(value)
        else:
            assert isinstance(node, str), node

    strings(table)


def _hccn_conf(ips: list[str]) -> str:
    lines = []
    for i, ip in enumerate(ips):  # the real file also holds netmask / netdetect / gateway lines per device
        lines += [f"address_{i}={ip}", f"netmask_{i}=255.255.255.0", f"netdetect_{i}=192.168.{i}.254"]
    return "\n".join(lines) + "\n"


def test_one_server_matches_the_guide():
    server = make_server("10.0.0.1", parse_device_ids("[0,8)"), GUIDE_ONE_SERVER_IPS)
    _same_as_guide(build_rank_table([server]), GUIDE_ONE_SERVER)


def test_two_servers_merged_match_the_guide():
    # As the guide does it: one table per server (each numbered from rank 0), then merged.
    per_server = [build_rank_table([make_server(sid, range(8), ips)]) for sid, ips in SERVER_IPS.items()]
    assert [t["server_list"][0]["device"][0]["rank_id"] for t in per_server] == ["0", "0"]
    _same_as_guide(merge_rank_tables(per_server), GUIDE_TWO_SERVERS)
    # Or both servers at once.
    both = [make_server(sid, range(8), ips) for sid, ips in SERVER_IPS.items()]
    _same_as_guide(build_rank_table(both), GUIDE_TWO_SERVERS)


def test_cli_writes_the_one_server_table_from_hccn_conf(tmp_path, capsys):
    conf = tmp_path / "hccn.conf"
    conf.write_text(_hccn_conf(GUIDE_ONE_SERVER_IPS))
    out = tmp_path / "hccl.json"
    rc = main(["launch", "ranktable", "--server", "10.0.0.1:0-7", "--hccn-conf", str(conf), "--out", str(out)])
    assert rc == 0
    assert f"export RANK_TABLE_FILE={out.resolve()}" in capsys.readouterr().out
    _same_as_guide(json.loads(out.read_text()), GUIDE_ONE_SERVER)
    assert out.read_text() == json.dumps(GUIDE_ONE_SERVER, indent=4) + "\n"  # hccl_tools.py's json.dump(indent=4)


def test_cli_merges_per_server_files_into_the_guides_two_server_table(tmp_path, capsys):
    files = []
    for sid, ips in SERVER_IPS.items():
        rc = main(["launch", "ranktable", "--server", sid, "--device-ip", ",".join(ips), "--out",
                   str(tmp_path / f"hccl_{sid}.json")])
        assert rc == 0
        files.append(str(tmp_path / f"hccl_{sid}.json"))
    merged = tmp_path / "merged.json"
    assert main(["launch", "ranktable", "--merge", *files, "--out", str(merged)]) == 0
    _same_as_guide(json.loads(merged.read_text()), GUIDE_TWO_SERVERS)
    # the same table straight from two --server / --device-ip pairs, printed
    capsys.readouterr()
    argv = ["launch", "ranktable", "--out", "-"]
    for sid, ips in SERVER_IPS.items():
        argv += ["--server", f"{sid}:0-7", "--device-ip", ",".join(ips)]
    assert main(argv) == 0
    _same_as_guide(json.loads(capsys.readouterr().out), GUIDE_TWO_SERVERS)


def test_default_file_names_are_mindformers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "ranktable", "--server", "10.0.0.1:0-3", "--device-ip",
                 ",".join(GUIDE_ONE_SERVER_IPS[:4])]) == 0
    single = tmp_path / "hccl_4p_0123_10.0.0.1.json"
    assert single.is_file()
    assert [d["device_id"] for d in json.loads(single.read_text())["server_list"][0]["device"]] == list("0123")
    assert default_name(GUIDE_TWO_SERVERS) == "hccl_2s_16p.json"  # merge_hccl.py's name


@pytest.mark.parametrize(
    ("text", "ids"),
    [("0-7", list(range(8))), ("[0,8)", list(range(8))), ("[4,8)", [4, 5, 6, 7]), ("0,1,2,3", [0, 1, 2, 3]),
     ("4", [4]), ("0-1,4-5", [0, 1, 4, 5])],
)
def test_device_id_forms(text, ids):
    assert parse_device_ids(text) == ids


def test_server_without_devices_means_the_whole_server():
    assert parse_server("10.0.0.9") == ("10.0.0.9", list(range(8)))


def test_hccn_conf_reads_only_addresses():
    assert parse_hccn_conf(_hccn_conf(["192.168.100.101", "192.168.101.101"])) == {
        0: "192.168.100.101", 1: "192.168.101.101"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--server", "10.0.0.1:0-7", "--device-ip", "192.168.0.1,192.168.0.2"], "8 devices but 2 device IPs"),
        (["--server", "node-1:0-7"], "'node-1' is not an IP address"),
        (["--server", "10.0.0.1:0-3", "--device-ip", "192.168.0.1,192.168.0.1,192.168.0.3,192.168.0.4"],
         "device IP 192.168.0.1 is given to two devices"),
        (["--server", "10.0.0.1:0-1", "--device-ip", "192.168.0.1,fe80::zz"], "is not an IP address"),
        (["--server", "10.0.0.1:0-3,2"], "names a device twice"),
        (["--server", "10.0.0.1:a-b"], "is not a device id or range"),
        (["--server", "10.0.0.1", "--server", "10.0.0.2"], "one --device-ip IP0,IP1,... per --server"),
        (["--server", "10.0.0.1:0", "--device-ip", "192.168.0.1", "--server", "10.0.0.1:1", "--device-ip",
          "192.168.0.2"], "server 10.0.0.1 appears twice"),
        ([], "give --server IP:DEVICES"),
        (["--merge", "missing.json"], "rank table missing.json does not exist"),
    ],
)
def test_cli_errors_are_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "ranktable", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_device_ips_missing_from_hccn_conf(tmp_path, capsys):
    conf = tmp_path / "hccn.conf"
    conf.write_text(_hccn_conf(["192.168.0.1", "192.168.0.2"]))
    assert main(["launch", "ranktable", "--server", "10.0.0.1:0-3", "--hccn-conf", str(conf), "--out", "-"]) == 2
    assert "no IP for device 2" in capsys.readouterr().err


def test_merge_refuses_what_is_not_a_rank_table(tmp_path):
    bad = {"version": "1.0", "server_count": "1", "servers": []}
    with pytest.raises(ConfigError, match="not an HCCL rank table"):
        merge_rank_tables([bad], ["bad.json"])
    wrong_count = dict(GUIDE_ONE_SERVER, server_count="2")
    with pytest.raises(ConfigError, match="server_count is 2 but server_list has 1"):
        merge_rank_tables([wrong_count], ["a.json"])
    with pytest.raises(ConfigError, match="server 10.0.0.1 appears twice"):
        merge_rank_tables([GUIDE_ONE_SERVER, GUIDE_ONE_SERVER])


def test_dump_is_what_the_mindformers_tools_write():
    assert dump_rank_table(GUIDE_TWO_SERVERS) == json.dumps(GUIDE_TWO_SERVERS, indent=4) + "\n"
