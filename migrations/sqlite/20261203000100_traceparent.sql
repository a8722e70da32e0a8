-- The producer's trace context (W3C `traceparent`, e.g.
-- 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01), optional. With
-- `[otel]` configured, the attempt's span is a child of it and the events a
-- handler emits carry the attempt's own context here, so a chain of events
-- is one trace. A value that is not W3C-valid is ignored (with a warning)
-- when the event runs; it never stops the event.
ALTER TABLE outbox_events ADD COLUMN traceparent TEXT;
