-- The outbox table of DESIGN.md. Left as it is when it already exists (for example a
-- Debezium-style table with other column names): only the relay's bookkeeping is added below.
CREATE TABLE IF NOT EXISTS {{table}} (
    {{id}}             uuid        PRIMARY KEY,
    {{aggregate_type}} text        NOT NULL,
    {{aggregate_id}}   text        NOT NULL,
    {{event_type}}     text        NOT NULL,
    {{payload}}        jsonb       NOT NULL,
    {{headers}}        jsonb       NOT NULL DEFAULT '{}',
    {{traceparent}}    text,
    {{tracestate}}     text,
    {{created_at}}     timestamptz NOT NULL DEFAULT now()
);
