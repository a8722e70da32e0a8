// Every import of the handler world, delegating to
// globalThis.fakes[interface][function]; calls are recorded in
// globalThis.calls as [interface, function, args].
const iface = new URL(import.meta.url).searchParams.get('iface');
globalThis.fakes ??= {};
globalThis.calls ??= [];

function fake(name) {
  return (...args) => {
    globalThis.calls.push([iface, name, args]);
    const f = globalThis.fakes[iface]?.[name];
    if (!f) throw new Error(`no fake for ${iface} ${name}`);
    return f(...args);
  };
}

export const execute = fake('execute');
export const query = fake('query');
export const emit = fake('emit');
export const get = fake('get');
export const set = fake('set');
const del = fake('delete');
export { del as delete };
export const exists = fake('exists');
export const expire = fake('expire');
export const setAdd = fake('setAdd');
export const setRemove = fake('setRemove');
export const setMembers = fake('setMembers');
export const log = fake('log');
export const handle = fake('handle');
export class Fields {
  static fromList(...args) {
    return fake('Fields.fromList')(...args);
  }
}
export class OutgoingRequest {}
export class OutgoingBody {}
export class RequestOptions {}
