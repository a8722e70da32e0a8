// An outrun event handler in JavaScript, built into a WebAssembly component
// by componentize-js (StarlingMonkey); README.md says how to build, check and
// run it.
//
// It handles `order.created` and shows each capability once: the event
// payload, outgoing HTTP, `sql` (written in the transaction that
// acknowledges the event), `kv` (a counter), `emit` (a follow-up event,
// inserted by that same transaction) and logging. Replace the example with
// your own logic.
import { config, emit, handler, http, kv, log, sql } from './outrun-sdk/index.js';
import { tier } from './logic.js';

export const handle = handler((event) => {
  // The payload: one that is not JSON is rejected (the event is dead at
  // once). A thrown Error fails the attempt retryably, with its message as
  // the event's last_error.
  const order = event.json();
  if (order.customer_id === undefined) throw new Error('customer_id is missing');

  // HTTP: hosts must be listed in `http` of [handler.allow]. raiseForStatus
  // retries a 5xx, 429 or 408 with backoff and rejects other errors.
  const base = config.get('customers_url', 'http://customers.local');
  const customer = http.get(`${base}/customers/${order.customer_id}`).raiseForStatus().json();

  // sql: runs inside the transaction that acknowledges the event, so the
  // row exists exactly when the event is done. Delivery is at least once:
  // ON CONFLICT makes a second delivery a no-op. Whole Numbers are passed
  // as integers (sql.float(x) for a float), BigInt for beyond 2^53.
  const level = tier(order.amount_cents, customer.vip ?? false);
  const inserted = sql.execute(
    'INSERT INTO order_tiers (order_id, tier) VALUES ($1, $2) ON CONFLICT (order_id) DO NOTHING',
    order.order_id,
    level,
  );
  if (inserted === 0) {
    log.info(`order ${order.order_id} was handled before`);
    return;
  }

  // kv: shared by all events of this handler; keys are confined to the
  // handler's prefix (`kv` in [handler.allow]). Not transactional.
  const count = Number(kv.getString('orders') ?? 0) + 1;
  kv.set('orders', String(count));

  // emit: a follow-up event, inserted by the same transaction. Options
  // (groupId, delay, expiresIn, maxRetry, idempotencyKey) default to unset.
  emit(
    'customer.welcomed',
    { order_id: order.order_id, email: customer.email, tier: level },
    { groupId: `customer:${order.customer_id}` },
  );

  // Logging: lines go to outrun's log with the handler, event id and version.
  log.info(`order ${order.order_id} is ${level} (order #${count})`);
});
