// outrun's JavaScript bench guest: parses the payload of every event it
// gets and returns, so `outrun bench --module target/guests/bench_js.wasm
// --handler noop|json` measures what a JavaScript handler costs per event
// (the engine's instantiation, or a warm instance with `--instances
// reuse`), not what it does.
import { handler } from './outrun-sdk/index.js';

export const handle = handler((event) => {
  event.json();
});
