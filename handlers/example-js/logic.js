// Pure logic lives in plain modules that import nothing of outrun:
// test.mjs checks them with node, no runtime needed.

export function tier(amountCents, vip) {
  return vip || amountCents >= 10000 ? 'gold' : 'standard';
}
