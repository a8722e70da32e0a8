// Host tests only: resolve the component's imports (`outrun:...`,
// `wasi:...`), which exist only inside a component, to recorders.
import { register } from 'node:module';

register('./loader.mjs', import.meta.url);
