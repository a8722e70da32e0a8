export async function resolve(specifier, context, next) {
  if (specifier.startsWith('outrun:') || specifier.startsWith('wasi:')) {
    const url = new URL('./fakes.mjs', import.meta.url);
    url.searchParams.set('iface', specifier);
    return { url: url.href, shortCircuit: true };
  }
  return next(specifier, context);
}
