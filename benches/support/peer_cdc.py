#!/usr/bin/env python3
"""Python peer for the replication benchmark: psycopg2 logical replication
(pgoutput, protocol 1) -> a minimal pgoutput parser -> dicts -> json ->
POST 5000 records per request; the position is confirmed after each POST.

Decodes Relation and Insert messages (all the benchmark produces); the same
mapping as the cobi-sync benchmark configuration. Stops after EXPECTED
inserted rows have been posted.

usage: peer_cdc.py DSN SLOT PUBLICATION API_BASE_URL API_KEY EXPECTED
prints: rows=<n>
"""

import json
import struct
import sys
import uuid
from datetime import datetime, timezone

import psycopg2
import psycopg2.extras
import requests

NAMESPACE = uuid.UUID("9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d")
BATCH = 5000
INT_OIDS = {20, 21, 23}
NUMERIC_OIDS = {700, 701, 1700}
TIMESTAMPTZ_OID = 1184


def uid(ty, value):
    if value is None:
        return None
    return str(uuid.uuid5(NAMESPACE, f"{ty}:{value}"))


def cstring(buf, pos):
    end = buf.index(b"\0", pos)
    return buf[pos:end].decode(), end + 1


def parse_relation(buf):
    (oid,) = struct.unpack_from("!I", buf, 1)
    pos = 5
    _ns, pos = cstring(buf, pos)
    name, pos = cstring(buf, pos)
    pos += 1  # replica identity
    (ncols,) = struct.unpack_from("!h", buf, pos)
    pos += 2
    cols = []
    for _ in range(ncols):
        pos += 1  # flags
        col, pos = cstring(buf, pos)
        type_oid, _typmod = struct.unpack_from("!Ii", buf, pos)
        pos += 8
        cols.append((col, type_oid))
    return oid, name, cols


def convert(text, type_oid):
    if text is None:
        return None
    if type_oid in INT_OIDS:
        return int(text)
    if type_oid in NUMERIC_OIDS:
        return float(text)
    if type_oid == TIMESTAMPTZ_OID:
        dt = datetime.fromisoformat(text)
        return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    return text


def parse_insert(buf, relations):
    oid, marker, ncols = struct.unpack_from("!IcH", buf, 1)
    name, cols = relations[oid]
    pos = 8
    row = {}
    for i in range(ncols):
        kind = buf[pos : pos + 1]
        pos += 1
        if kind == b"t":
            (length,) = struct.unpack_from("!i", buf, pos)
            pos += 4
            value = buf[pos : pos + length].decode()
            pos += length
        else:  # 'n' null, 'u' unchanged toast
            value = None
        col, type_oid = cols[i]
        row[col] = convert(value, type_oid)
    return name, row


def to_record(table, row):
    if table == "merchant":
        return "shops", {
            "shop_id": uid("shops", row["id"]),
            "name": row["trade_name"],
            "region": row["country"].upper(),
            "updated": row["modified_at"],
        }
    return "transactions", {
        "transaction_id": uid("transactions", row["id"]),
        "student_id": uid("customers", row["member_ref"]),
        "shop_id": uid("shops", row["shop_ref"]),
        "offer_id": uid("offers", row["promo_ref"]),
        "branch_id": uid("branches", row["outlet_ref"]),
        "region": row["country"].upper(),
        "source": row["channel"],
        "savings": row["saved"],
        "amount": row["total"],
        "updated": row["modified_at"],
    }


def main():
    dsn, slot, publication, api, key, expected = sys.argv[1:7]
    expected = int(expected)
    session = requests.Session()
    session.headers.update(
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    conn = psycopg2.connect(
        dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection
    )
    cur = conn.cursor()
    cur.start_replication(
        slot_name=slot,
        decode=False,
        options={"proto_version": "1", "publication_names": publication},
    )
    relations = {}
    pending = {}  # type -> records
    state = {"posted": 0, "seen": 0}

    def flush(lsn):
        for ty in ("shops", "transactions"):
            records = pending.pop(ty, None)
            if records:
                r = session.post(
                    f"{api}/v1/data/{ty}", data=json.dumps({"records": records})
                )
                if r.status_code != 200:
                    raise SystemExit(f"POST {ty}: {r.status_code} {r.text[:500]}")
                state["posted"] += len(records)
        cur.send_feedback(flush_lsn=lsn)

    def consume(msg):
        buf = msg.payload
        tag = buf[0:1]
        if tag == b"R":
            oid, name, cols = parse_relation(buf)
            relations[oid] = (name, cols)
        elif tag == b"I":
            table, row = parse_insert(buf, relations)
            ty, record = to_record(table, row)
            pending.setdefault(ty, []).append(record)
            state["seen"] += 1
            if len(pending[ty]) >= BATCH:
                flush(msg.data_start)
        elif tag == b"C":
            if state["seen"] >= expected:
                flush(msg.data_start)
                raise psycopg2.extras.StopReplication()
        # B(egin), others: nothing to do

    try:
        cur.consume_stream(consume)
    except psycopg2.extras.StopReplication:
        pass
    conn.close()
    print(f"rows={state['posted']}", flush=True)


if __name__ == "__main__":
    main()
