/**
 * A bounded window of fetches consumed in order: the catch-up of the index cache (SPEC.md 19.4) must ingest
 * segments one at a time in key order, but waiting for each GET before asking for the next makes a store's
 * latency the cost of every segment. Here up to `width` fetches run at once (and no more than `budget` bytes
 * of them, by each item's stated weight, except that one always may), while `consume` still sees the results
 * strictly in the items' order, one at a time. Memory holds at most the window (and the result being
 * consumed), never every item's result.
 */
export interface WindowLimits {
  /** Fetches in flight at most. */
  width: number;
  /** Sum of the weights of the fetched-but-not-consumed items at most (one item alone may exceed it). */
  budget: number;
}

export async function consumeInOrder<T, R>(
  items: readonly T[],
  limits: WindowLimits,
  weight: (item: T) => number,
  fetch: (item: T) => Promise<R>,
  consume: (item: T, result: R) => Promise<void>,
): Promise<void> {
  const pending: { item: T; weight: number; result: Promise<R> }[] = [];
  let next = 0;
  let held = 0;
  // Each item is weighed once, in order, right before its fetch may start (a caller may decide there).
  let nextWeight: number | undefined;
  const fill = (): void => {
    while (next < items.length && pending.length < limits.width) {
      const item = items[next]!;
      const w = (nextWeight ??= weight(item));
      if (pending.length > 0 && held + w > limits.budget) return;
      nextWeight = undefined;
      next++;
      held += w;
      const result = fetch(item);
      // Observed here so that a failure while earlier items are consumed is not an unhandled rejection;
      // it is rethrown when its turn comes (or dropped if an earlier one failed first).
      result.catch(() => undefined);
      pending.push({ item, weight: w, result });
    }
  };
  try {
    fill();
    while (pending.length > 0) {
      const head = pending[0]!;
      const result = await head.result;
      pending.shift();
      held -= head.weight;
      // The next fetches start before this result is consumed: the store works while LevelDB does.
      fill();
      await consume(head.item, result);
    }
  } catch (error) {
    // Nothing of this window outlives the call: fetches still in flight finish (or fail) first.
    await Promise.allSettled(pending.map((p) => p.result));
    throw error;
  }
}
