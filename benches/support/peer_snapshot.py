#!/usr/bin/env python3
"""Python peer for the snapshot benchmark: the straightforward script a
partner would write instead of running cobi-sync.

Server-side cursor -> rows -> dicts -> json -> POST 5000 records per
request, shops first (their transactions reference them), then
transactions. The same mapping as the cobi-sync benchmark configuration
(uuid5 ids in the cobi-sync namespace, upper-cased region, numbers as JSON
numbers, timestamps as RFC 3339 UTC).

usage: peer_snapshot.py DSN API_BASE_URL API_KEY
prints: rows=<n>
"""

import json
import sys
import uuid
from datetime import timezone

import psycopg2
import requests

NAMESPACE = uuid.UUID("9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d")
BATCH = 5000


def uid(ty, value):
    if value is None:
        return None
    return str(uuid.uuid5(NAMESPACE, f"{ty}:{value}"))


def ts(value):
    if value is None:
        return None
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def num(value):
    return None if value is None else float(value)


def main():
    dsn, api, key = sys.argv[1:4]
    session = requests.Session()
    session.headers.update(
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )

    def post(ty, records):
        r = session.post(f"{api}/v1/data/{ty}", data=json.dumps({"records": records}))
        if r.status_code != 200:
            raise SystemExit(f"POST {ty}: {r.status_code} {r.text[:500]}")

    conn = psycopg2.connect(dsn)
    total = 0

    def upload(ty, sql, to_record):
        nonlocal total
        with conn.cursor(name=f"snap_{ty}") as cur:
            cur.itersize = BATCH
            cur.execute(sql)
            batch = []
            for row in cur:
                batch.append(to_record(row))
                if len(batch) == BATCH:
                    post(ty, batch)
                    total += len(batch)
                    batch = []
            if batch:
                post(ty, batch)
                total += len(batch)
        conn.commit()

    upload(
        "shops",
        "SELECT id, trade_name, country, modified_at FROM merchant ORDER BY id",
        lambda r: {
            "shop_id": uid("shops", r[0]),
            "name": r[1],
            "region": r[2].upper(),
            "updated": ts(r[3]),
        },
    )
    upload(
        "transactions",
        "SELECT id, shop_ref, member_ref, promo_ref, outlet_ref, country, channel,"
        " saved, total, modified_at FROM purchase ORDER BY id",
        lambda r: {
            "transaction_id": uid("transactions", r[0]),
            "student_id": uid("customers", r[2]),
            "shop_id": uid("shops", r[1]),
            "offer_id": uid("offers", r[3]),
            "branch_id": uid("branches", r[4]),
            "region": r[5].upper(),
            "source": r[6],
            "savings": num(r[7]),
            "amount": num(r[8]),
            "updated": ts(r[9]),
        },
    )
    conn.close()
    print(f"rows={total}", flush=True)


if __name__ == "__main__":
    main()
