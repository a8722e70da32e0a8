"""An outrun event handler in Python, built into a WebAssembly component by
componentize-py (README.md says how to build, check and run it).

It handles `order.created` and shows each capability once: the event
payload, outgoing HTTP, `sql` (written in the transaction that acknowledges
the event), `kv` (a counter), `emit` (a follow-up event, inserted by that
same transaction) and logging. Replace the example with your own logic.
"""

from outrun_sdk import config, emit, handler, http, kv, log, sql


def tier(amount_cents: int, vip: bool) -> str:
    """Pure logic lives in plain functions: test_app.py checks them on the
    host, no runtime needed."""
    return "gold" if vip or amount_cents >= 10_000 else "standard"


@handler
def handle(event):
    # The payload: one that is not JSON is rejected (the event is dead at
    # once). A missing field raises KeyError, which, like any exception,
    # fails the attempt retryably with the traceback's last line as the
    # event's last_error.
    order = event.json()
    order_id = order["order_id"]
    customer_id = order["customer_id"]

    # HTTP: hosts must be listed in `http` of [handler.allow]. raise_for_status
    # retries a 5xx, 429 or 408 with backoff and rejects other errors.
    base = config.get("customers_url", "http://customers.local")
    customer = http.get(f"{base}/customers/{customer_id}").raise_for_status().json()

    # sql: runs inside the transaction that acknowledges the event, so the
    # row exists exactly when the event is done. Delivery is at least once:
    # ON CONFLICT makes a second delivery a no-op. Parameters convert by
    # themselves (int, float, str, bytes, bool, None).
    level = tier(order["amount_cents"], customer.get("vip", False))
    inserted = sql.execute(
        "INSERT INTO order_tiers (order_id, tier) VALUES ($1, $2) ON CONFLICT (order_id) DO NOTHING",
        order_id,
        level,
    )
    if inserted == 0:
        log.info(f"order {order_id} was handled before")
        return

    # kv: shared by all events of this handler; keys are confined to the
    # handler's prefix (`kv` in [handler.allow]). Not transactional.
    count = int(kv.get_str("orders") or 0) + 1
    kv.set("orders", str(count))

    # emit: a follow-up event, inserted by the same transaction. Options
    # (group_id, delay, expires_in, max_retry, idempotency_key) default to unset.
    emit(
        "customer.welcomed",
        {"order_id": order_id, "email": customer["email"], "tier": level},
        group_id=f"customer:{customer_id}",
    )

    # Logging: lines go to outrun's log with the handler, event id and version.
    log.info(f"order {order_id} is {level} (order #{count})")
