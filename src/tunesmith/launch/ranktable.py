"""HCCL rank tables (RANK_TABLE_FILE) for Ascend NPU jobs: ``tunesmith launch ranktable``.

The format is the one MindFormers' ``hccl_tools.py`` writes and ``merge_hccl.py`` merges (guide 002)::

    {"version": "1.0", "server_count": "2",
     "server_list": [{"server_id": "10.0.0.1",
                      "device": [{"device_id": "0", "device_ip": "192.168.0.0", "rank_id": "0"}, ...],
                      "host_nic_ip": "reserve"}, ...],
     "status": "completed"}

Every value is a string; keys keep this order; rank ids run 0..N-1 across servers in server order. A device's IP
is its NIC address from ``hccn_tool -i N -ip -g`` or ``/etc/hccn.conf`` (``address_N=IP``), or given by hand.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError
from tunesmith.logging import get_logger

log = get_logger("launch")

HCCN_CONF = Path("/etc/hccn.conf")
_HCCN_ADDRESS = re.compile(r"^\s*address_(\d+)\s*=\s*(\S+)\s*$")


@dataclass(frozen=True)
class Server:
    """One machine of the table: its IP and its devices' (id, NIC IP), in rank order."""

    server_id: str
    devices: tuple[tuple[str, str], ...]


def parse_device_ids(text: str) -> list[int]:
    """``0-7``, ``0,1,2,3``, ``4`` or MindFormers' ``[0,8)`` → device ids (in the order given)."""
    text = text.strip().replace(" ", "")
    bracket = re.fullmatch(r"\[(\d+),(\d+)[\])]", text)
    if bracket:  # hccl_tools' --device_num "[0,8)": half-open
        ids = list(range(int(bracket[1]), int(bracket[2])))
    else:
        ids = []
        for part in text.split(","):
            span = re.fullmatch(r"(\d+)-(\d+)", part)
            if span and int(span[1]) <= int(span[2]):
                ids.extend(range(int(span[1]), int(span[2]) + 1))
            elif part.isdigit():
                ids.append(int(part))
            else:
                raise ConfigError(
                    f"devices {text!r}: {part!r} is not a device id or range; write them like 0-7, 0,1,2,3 or [0,8)"
                )
    if not ids:
        raise ConfigError(f"devices {text!r} names no device; write them like 0-7")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"devices {text!r} names a device twice; list each device once")
    return ids


def parse_server(text: str) -> tuple[str, list[int]]:
    """``10.0.0.1:0-7`` → ("10.0.0.1", [0..7]); a bare IP means devices 0-7 (a full Atlas 800 server)."""
    host, sep, devices = text.partition(":")
    _check_ip(host, f"--server {text}")
    return host, parse_device_ids(devices if sep else "0-7")


def parse_hccn_conf(text: str) -> dict[int, str]:
    """``/etc/hccn.conf`` → {device id: NIC IP} from its ``address_N=IP`` lines (netmask_N etc. are skipped)."""
    return {int(m[1]): m[2] for line in text.splitlines() if (m := _HCCN_ADDRESS.match(line))}


def _check_ip(value: str, where: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an IP address; give the address, e.g. 10.0.0.1") from None


def _hccn_tool_ips(device_ids: Sequence[int]) -> dict[int, str] | None:
    """Ask ``hccn_tool`` (what hccl_tools.py tries first); None where it is missing or answers nothing."""
    if shutil.which("hccn_tool") is None:
        return None
    ips = {}
    for device in device_ids:
        try:
            out = subprocess.run(["hccn_tool", "-i", str(device), "-ip", "-g"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        match = re.search(r"ipaddr:\s*(\S+)", out)
        if not match:
            return None
        ips[device] = match[1]
    return ips


def local_device_ips(device_ids: Sequence[int], hccn_conf: Path | None = None) -> dict[int, str]:
    """This machine's device NIC IPs: ``hccn_conf`` if given, else ``hccn_tool``, else ``/etc/hccn.conf``."""
    if hccn_conf is None:
        found = _hccn_tool_ips(device_ids)
        if found is not None:
            return found
        hccn_conf = HCCN_CONF
    try:
        return parse_hccn_conf(hccn_conf.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(
            f"cannot read device IPs from {hccn_conf} ({err.strerror}); on the Ascend server itself run "
            "`hccn_tool -i 0 -ip -g`, or pass them with --device-ip IP0,IP1,... (or --hccn-conf FILE)"
        ) from None


def make_server(server_id: str, device_ids: Sequence[int], device_ips: dict[int, str] | Sequence[str]) -> Server:
    """A server entry; ``device_ips`` is {device id: IP} or a list with one IP per device, in order."""
    _check_ip(server_id, "server")
    if not isinstance(device_ips, dict):
        ips = list(device_ips)
        if len(ips) != len(device_ids):
            raise ConfigError(
                f"server {server_id}: {len(device_ids)} devices but {len(ips)} device IPs; give one IP per device"
            )
        device_ips = dict(zip(device_ids, ips, strict=True))
    missing = [d for d in device_ids if d not in device_ips]
    if missing:
        raise ConfigError(
            f"server {server_id}: no IP for device {missing[0]} (the device list names {len(device_ids)}, the "
            f"IPs cover {sorted(device_ips)}); add address_{missing[0]}=IP or pass --device-ip"
        )
    devices = tuple((str(d), str(device_ips[d]).strip()) for d in device_ids)
    for device, ip in devices:
        _check_ip(ip, f"server {server_id} device {device}")
    ips = [ip for _, ip in devices]
    duplicate = next((ip for ip in ips if ips.count(ip) > 1), None)
    if duplicate:
        raise ConfigError(f"server {server_id}: device IP {duplicate} is given to two devices; each NIC has its own")
    _warn_about_grouping(server_id, [int(d) for d, _ in devices])
    return Server(server_id, devices)


def _warn_about_grouping(server_id: str, ids: list[int]) -> None:
    # hccl_tools.py refuses device sets that straddle the two 4-chip groups of an Atlas 800 (910A) unless they
    # are the whole server: HCCS links chips only inside a group. Newer servers do not have that limit.
    low, high = min(ids), max(ids)
    if low < 4 <= high and sorted(ids) != list(range(8)):
        log.warning(
            "server %s: devices %s span both 4-chip groups; on an Atlas 800 (910A) HCCL wants devices within 0-3 "
            "or 4-7, or all 8", server_id, ",".join(map(str, ids)))
    if len(ids) not in (1, 2, 4, 8):
        log.warning("server %s: %d devices; HCCL on Atlas 800 (910A) supports 1, 2, 4 or 8 per server",
                    server_id, len(ids))


def build_rank_table(servers: Sequence[Server]) -> dict[str, Any]:
    """The table for these servers, rank ids numbered across them in order (as merge_hccl.py does)."""
    if not servers:
        raise ConfigError("a rank table needs at least one server; pass --server IP:DEVICES")
    ids = [s.server_id for s in servers]
    duplicate = next((sid for sid in ids if ids.count(sid) > 1), None)
    if duplicate:
        raise ConfigError(
            f"server {duplicate} appears twice; every server of the job once (a table generated on a machine "
            "whose IP was guessed as 127.0.0.1? pass --server with its real IP)"
        )
    server_list = []
    rank = 0
    for server in servers:
        devices = []
        for device_id, device_ip in server.devices:
            devices.append({"device_id": device_id, "device_ip": device_ip, "rank_id": str(rank)})
            rank += 1
        server_list.append({"server_id": server.server_id, "device": devices, "host_nic_ip": "reserve"})
    return {
        "version": "1.0",
        "server_count": str(len(servers)),
        "server_list": server_list,
        "status": "completed",
    }


def servers_of(table: dict[str, Any], where: str = "rank table") -> list[Server]:
    """Read a rank table back (validating its shape) into :class:`Server` entries."""
    try:
        entries = table["server_list"]
        servers = [
            Server(str(entry["server_id"]),
                   tuple((str(d["device_id"]), str(d["device_ip"])) for d in entry["device"]))
            for entry in entries
        ]
    except (KeyError, TypeError):
        raise ConfigError(
            f"{where} is not an HCCL rank table (server_list / server_id / device / device_id / device_ip "
            "missing); give files written by `tunesmith launch ranktable` or hccl_tools.py"
        ) from None
    if str(table.get("server_count", len(servers))) != str(len(servers)):
        raise ConfigError(
            f"{where}: server_count is {table.get('server_count')} but server_list has {len(servers)} servers; "
            "regenerate it"
        )
    return servers


def merge_rank_tables(tables: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """One table from per-server tables (merge_hccl.py): servers in the given order, rank ids renumbered."""
    names = list(names or [f"table {i + 1}" for i in range(len(tables))])
    servers = [server for table, name in zip(tables, names, strict=True) for server in servers_of(table, name)]
    return build_rank_table(servers)


def default_name(table: dict[str, Any]) -> str:
    """MindFormers' file names: ``hccl_8p_01234567_10.0.0.1.json`` for one server, ``hccl_2s_16p.json`` merged."""
    servers = table["server_list"]
    ranks = sum(len(s["device"]) for s in servers)
    if len(servers) == 1:
        ids = "".join(d["device_id"] for d in servers[0]["device"])
        return f"hccl_{ranks}p_{ids}_{servers[0]['server_id']}.json"
    return f"hccl_{len(servers)}s_{ranks}p.json"


def dump_rank_table(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=4) + "\n"  # json.dump(indent=4), as hccl_tools.py writes it


def _read_table(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"rank table {path} does not exist; check the path") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); give a rank table file") from None


def table_from_args(args: argparse.Namespace, device_ips: Callable[..., dict[int, str]] = local_device_ips
                    ) -> dict[str, Any]:
    """The table the command line asks for (``--merge`` files, or ``--server`` entries)."""
    if args.merge:
        if args.server:
            raise ConfigError("--merge and --server do not mix; merge files, or build a table from --server")
        return merge_rank_tables([_read_table(p) for p in args.merge], args.merge)
    if not args.server:
        raise ConfigError("give --server IP:DEVICES (e.g. --server 10.0.0.1:0-7), or --merge FILE FILE ...")
    ip_lists = args.device_ip or []
    if ip_lists and len(ip_lists) != len(args.server):
        raise ConfigError(
            f"{len(args.server)} --server but {len(ip_lists)} --device-ip; give one --device-ip list per --server, "
            "in the same order"
        )
    if not ip_lists and len(args.server) > 1:
        raise ConfigError(
            "several --server need their device IPs: one --device-ip IP0,IP1,... per --server (or build one "
            "table per server on that server and --merge them)"
        )
    servers = []
    for i, text in enumerate(args.server):
        host, ids = parse_server(text)
        if ip_lists:
            ips: dict[int, str] | list[str] = [ip.strip() for ip in ip_lists[i].split(",") if ip.strip()]
        else:
            ips = device_ips(ids, Path(args.hccn_conf) if args.hccn_conf else None)
        servers.append(make_server(host, ids, ips))
    return build_rank_table(servers)


def _cmd_ranktable(args: argparse.Namespace) -> int:
    table = table_from_args(args)
    text = dump_rank_table(table)
    if args.out == "-":
        print(text, end="")
        return 0
    out = Path(args.out) if args.out else Path(default_name(table))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    ranks = sum(len(s["device"]) for s in table["server_list"])
    print(f"wrote {out} ({table['server_count']} servers, {ranks} ranks); use it with: "
          f"export RANK_TABLE_FILE={out.resolve()}")
    return 0


def add_launch_parser(launch_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``ranktable`` under ``tunesmith launch``."""
    p = launch_subparsers.add_parser(
        "ranktable",
        help="write the HCCL RANK_TABLE_FILE of an Ascend job (MindFormers hccl_tools.py / merge_hccl.py format)",
        description="Build an HCCL rank table from servers and their devices' NIC IPs, or merge per-server "
        "tables (rank ids renumbered across servers). Device IPs come from --device-ip, --hccn-conf, "
        "`hccn_tool`, or /etc/hccn.conf (address_N=IP), in that order.",
    )
    p.add_argument("--server", action="append", metavar="IP[:DEVICES]",
                   help="a server and its devices: 10.0.0.1:0-7, 10.0.0.1:0,1,2,3 or 10.0.0.1:[0,8) (default "
                   "devices 0-7); repeat for several servers")
    p.add_argument("--device-ip", action="append", metavar="IP0,IP1,...",
                   help="the devices' NIC IPs in device order, one list per --server (default: read on this "
                   "machine)")
    p.add_argument("--hccn-conf", metavar="FILE", help="read device IPs from this hccn.conf (address_N=IP lines)")
    p.add_argument("--merge", nargs="+", metavar="FILE", help="merge these per-server tables, in this order")
    p.add_argument("--out", metavar="FILE",
                   help="where to write it ('-': print; default: MindFormers' name, hccl_8p_01234567_IP.json or "
                   "hccl_2s_16p.json)")
    p.set_defaults(func=_cmd_ranktable)
    return p
