-- The one source of the database schema. `refundctl db migrate` applies it; every
-- statement is safe to run again.

CREATE TABLE IF NOT EXISTS merchants (
    merchant_id         text PRIMARY KEY CHECK (merchant_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    env                 text NOT NULL CHECK (env IN ('sandbox', 'production')),
    service_id          bigint NOT NULL CHECK (service_id > 0),
    access_key          text NOT NULL,
    -- secrets are sealed by the vault (AES-256-GCM envelope); never stored in plain text
    secret_key_sealed   bytea NOT NULL,
    private_key_sealed  bytea NOT NULL,
    public_key_pem      text NOT NULL,
    rate_limit          numeric(10, 2) NOT NULL DEFAULT 10 CHECK (rate_limit > 0),
    approval_threshold  numeric(14, 2) CHECK (approval_threshold > 0),
    refund_mode         text NOT NULL DEFAULT 'auto' CHECK (refund_mode IN ('auto', 'approval', 'off')),
    notify_url          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- Secret rotation: the previous secretKey still verifies notifications until the overlap ends.
ALTER TABLE merchants ADD COLUMN IF NOT EXISTS previous_secret_key_sealed bytea;
ALTER TABLE merchants ADD COLUMN IF NOT EXISTS previous_secret_valid_until timestamptz;

-- Original paid transactions (PagoEfectivo CIPs). refunded_amount is the sum of every
-- refund of this payment that is not failed or rejected, kept by the trigger below.
CREATE TABLE IF NOT EXISTS payments (
    merchant_id       text NOT NULL REFERENCES merchants (merchant_id),
    transaction_id    text NOT NULL,
    amount            numeric(14, 2) NOT NULL CHECK (amount > 0),
    currency          text NOT NULL CHECK (currency IN ('PEN', 'USD')),
    method            text NOT NULL DEFAULT 'cash' CHECK (method IN ('cash', 'bank_transfer')),
    paid_at           timestamptz NOT NULL,
    transaction_code  text,
    refunded_amount   numeric(14, 2) NOT NULL DEFAULT 0,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, transaction_id),
    CONSTRAINT refunds_within_paid_amount CHECK (refunded_amount >= 0 AND refunded_amount <= amount)
);

CREATE TABLE IF NOT EXISTS refunds (
    refund_id                uuid PRIMARY KEY,
    merchant_id              text NOT NULL,
    external_ref             text NOT NULL CHECK (length(external_ref) BETWEEN 1 AND 64),
    original_transaction_id  text NOT NULL,
    amount                   numeric(14, 2) NOT NULL CHECK (amount > 0),
    currency                 text NOT NULL CHECK (currency IN ('PEN', 'USD')),
    reason                   text,
    state                    text NOT NULL CHECK (state IN ('queued', 'awaiting_approval', 'submitted',
                                 'pending', 'succeeded', 'failed', 'rejected', 'manual_review')),
    requested_by             text,
    attempts                 integer NOT NULL DEFAULT 0,
    claimed_until            timestamptz,
    -- outbox: when the refund was last handed to Redis (or is due to be picked up)
    delivered_at             timestamptz,
    -- status polling of refunds the gateway accepted but has not settled
    status_checks            integer NOT NULL DEFAULT 0,
    next_check_at            timestamptz,
    provider_refund_id       text,
    provider_code            text,
    provider_message         text,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    completed_at             timestamptz,
    CONSTRAINT refunds_external_ref_unique UNIQUE (merchant_id, external_ref),
    FOREIGN KEY (merchant_id, original_transaction_id) REFERENCES payments (merchant_id, transaction_id)
);
-- The X-Request-Id of the intake call that created the refund (NULL from other doors): the
-- workers tag their log lines for the refund with it, so an API call joins the lines it caused.
ALTER TABLE refunds ADD COLUMN IF NOT EXISTS request_id text CHECK (length(request_id) <= 128);
CREATE INDEX IF NOT EXISTS refunds_open_idx ON refunds (state, updated_at)
    WHERE state IN ('queued', 'submitted', 'pending');
CREATE INDEX IF NOT EXISTS refunds_payment_idx ON refunds (merchant_id, original_transaction_id);
-- Refunds in creation order, a page at a time: reports, reconcile and the listings read keyset
-- pages (created_at, refund_id) of a period, an index range each instead of a scan of the table.
CREATE INDEX IF NOT EXISTS refunds_created_idx ON refunds (created_at, refund_id);

-- Audit trail: one row per state change, written in the same transaction as the change.
CREATE TABLE IF NOT EXISTS refund_events (
    event_id     bigserial PRIMARY KEY,
    refund_id    uuid NOT NULL REFERENCES refunds (refund_id),
    from_state   text,
    to_state     text NOT NULL,
    actor        text NOT NULL,
    code         text,
    message      text,
    occurred_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS refund_events_refund_idx ON refund_events (refund_id, event_id);

-- Notification deduplication: PagoEfectivo may deliver the same notification many times.
CREATE TABLE IF NOT EXISTS notifications (
    merchant_id       text NOT NULL,
    operation_number  text NOT NULL,
    event_type        text NOT NULL,
    result            text NOT NULL,
    body              jsonb NOT NULL,
    received_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, operation_number)
);

CREATE INDEX IF NOT EXISTS notifications_received_idx ON notifications (received_at);

-- Intake API tokens: only the SHA-256 of the token is kept.
CREATE TABLE IF NOT EXISTS api_tokens (
    name        text PRIMARY KEY,
    token_hash  text NOT NULL UNIQUE,
    merchants   text[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- The refund cap lives in the database: every refund that is not failed or rejected
-- reserves its amount on the payment row. The UPDATE takes the payment's row lock, so
-- concurrent producers are serialised and the CHECK above refuses the one that would
-- go over the paid amount.
CREATE OR REPLACE FUNCTION refunds_reserve_amount() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    releases constant text[] := ARRAY['failed', 'rejected'];
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NOT NEW.state = ANY (releases) THEN
            UPDATE payments SET refunded_amount = refunded_amount + NEW.amount
             WHERE merchant_id = NEW.merchant_id AND transaction_id = NEW.original_transaction_id;
        END IF;
    ELSIF NEW.state = ANY (releases) AND NOT OLD.state = ANY (releases) THEN
        UPDATE payments SET refunded_amount = refunded_amount - OLD.amount
         WHERE merchant_id = OLD.merchant_id AND transaction_id = OLD.original_transaction_id;
    ELSIF OLD.state = ANY (releases) AND NOT NEW.state = ANY (releases) THEN
        -- an operator's retry of a failed refund reserves its amount again
        UPDATE payments SET refunded_amount = refunded_amount + NEW.amount
         WHERE merchant_id = NEW.merchant_id AND transaction_id = NEW.original_transaction_id;
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS refunds_reserve_amount ON refunds;
CREATE TRIGGER refunds_reserve_amount
    AFTER INSERT OR UPDATE OF state ON refunds
    FOR EACH ROW EXECUTE FUNCTION refunds_reserve_amount();

-- Amount, currency and payment of a refund never change after it is accepted.
CREATE OR REPLACE FUNCTION refunds_freeze_terms() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.amount, NEW.currency, NEW.merchant_id, NEW.original_transaction_id, NEW.external_ref)
       IS DISTINCT FROM
       (OLD.amount, OLD.currency, OLD.merchant_id, OLD.original_transaction_id, OLD.external_ref) THEN
        RAISE EXCEPTION 'the terms of refund % are immutable', OLD.refund_id;
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS refunds_freeze_terms ON refunds;
CREATE TRIGGER refunds_freeze_terms
    BEFORE UPDATE ON refunds
    FOR EACH ROW EXECUTE FUNCTION refunds_freeze_terms();

-- Webhooks to calling services (docs/WEBHOOKS.md). An endpoint receives the events of its
-- merchants it subscribed to; its signing secret is sealed by the vault, like every secret.
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    endpoint_id                  uuid PRIMARY KEY,
    name                         text NOT NULL,
    url                          text NOT NULL CHECK (url ~ '^https?://'),
    merchants                    text[] NOT NULL CHECK (cardinality(merchants) > 0),
    event_types                  text[] NOT NULL CHECK (cardinality(event_types) > 0),
    secret_sealed                bytea NOT NULL,
    previous_secret_sealed       bytea,
    previous_secret_valid_until  timestamptz,
    disabled_at                  timestamptz,
    created_at                   timestamptz NOT NULL DEFAULT now()
);
-- The name of the intake token that created the endpoint (refunds.tokens: a token's name is its
-- caller's identity): only that caller manages it through the intake. NULL for an endpoint an
-- operator made (refundctl webhooks add), and for every endpoint made before this column: who
-- created those was never recorded, so they are managed through refundctl only (docs/WEBHOOKS.md).
ALTER TABLE webhook_endpoints ADD COLUMN IF NOT EXISTS owner text;

-- The outbox: an event is written by the trigger below in the same transaction as the state
-- move that causes it, so none is lost and none is invented by a move rolled back. Its data
-- is the refund as the intake API shows it at that moment.
CREATE TABLE IF NOT EXISTS webhook_events (
    event_id     text PRIMARY KEY,
    refund_id    uuid NOT NULL REFERENCES refunds (refund_id) ON DELETE CASCADE,
    merchant_id  text NOT NULL,
    event_type   text NOT NULL,
    data         jsonb NOT NULL,
    occurred_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhook_events_occurred_idx ON webhook_events (occurred_at);

-- One row per (event, endpoint): delivered once a 2xx came back, retried until then, failed
-- after the retry horizon. A 'sending' row's lease lets a delivery lost with a worker go again.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    event_id         text NOT NULL REFERENCES webhook_events (event_id) ON DELETE CASCADE,
    endpoint_id      uuid NOT NULL REFERENCES webhook_endpoints (endpoint_id) ON DELETE CASCADE,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    last_status      integer,
    last_error       text,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, endpoint_id)
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE state IN ('pending', 'sending');
-- An endpoint's next due delivery, in order (a worker passing its slot on: refunds.webhooks.next_due),
-- read from the index instead of sorting the endpoint's pending ones (a replay makes thousands due at once).
CREATE INDEX IF NOT EXISTS webhook_deliveries_next_idx ON webhook_deliveries (endpoint_id, next_attempt_at, event_id)
    WHERE state = 'pending';

-- Every attempt, for operators: its status (or error) and how long it took.
CREATE TABLE IF NOT EXISTS webhook_attempts (
    event_id     text NOT NULL,
    endpoint_id  uuid NOT NULL,
    attempt      integer NOT NULL,
    status       integer,
    error        text,
    latency_ms   integer NOT NULL,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, endpoint_id, attempt),
    FOREIGN KEY (event_id, endpoint_id) REFERENCES webhook_deliveries (event_id, endpoint_id) ON DELETE CASCADE
);

-- The audit rows of a move are the outbox's source: a refund accepted, or reaching pending or a
-- final state, becomes an event for every enabled endpoint subscribed to it (none: nothing written).
-- Deliveries written, it notifies the channel webhook_deliveries: the scheduler LISTENs on it and
-- hands them to the workers at once instead of at its next pass. Postgres sends the notification
-- at commit (none for a move rolled back) and folds a transaction's identical ones into one.
-- It runs once per statement over the rows it inserted (the workers and the receiver move refunds
-- many to a statement), so with webhooks off a statement costs one look at an empty table.
CREATE OR REPLACE FUNCTION refund_events_to_webhooks() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM webhook_endpoints WHERE disabled_at IS NULL) THEN
        RETURN NULL;
    END IF;
    WITH moves AS (
        SELECT a.refund_id, a.to_state, a.occurred_at,
               CASE WHEN a.from_state IS NULL THEN 'refund.accepted'
                    WHEN a.to_state IN ('pending', 'succeeded', 'failed', 'rejected', 'manual_review')
                    THEN 'refund.' || a.to_state END AS kind
          FROM audited a
    ), events AS (
        INSERT INTO webhook_events (event_id, refund_id, merchant_id, event_type, data, occurred_at)
        SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''), refund.refund_id, refund.merchant_id, m.kind,
               jsonb_build_object(
                   'refund_id', refund.refund_id, 'merchant_id', refund.merchant_id, 'external_ref', refund.external_ref,
                   'original_transaction_id', refund.original_transaction_id, 'amount', refund.amount::text,
                   'currency', refund.currency, 'reason', refund.reason, 'state', m.to_state,
                   'requested_by', refund.requested_by, 'attempts', refund.attempts,
                   'provider_refund_id', refund.provider_refund_id, 'provider_code', refund.provider_code,
                   'provider_message', refund.provider_message,
                   'created_at', to_char(refund.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
                   'updated_at', to_char(refund.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
                   'completed_at', to_char(refund.completed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')),
               m.occurred_at
          FROM moves m JOIN refunds refund ON refund.refund_id = m.refund_id
         WHERE m.kind IS NOT NULL
           AND EXISTS (SELECT 1 FROM webhook_endpoints w WHERE w.disabled_at IS NULL
                          AND refund.merchant_id = ANY (w.merchants) AND m.kind = ANY (w.event_types))
        RETURNING event_id, merchant_id, event_type
    )
    INSERT INTO webhook_deliveries (event_id, endpoint_id)
    SELECT e.event_id, w.endpoint_id
      FROM events e JOIN webhook_endpoints w
        ON w.disabled_at IS NULL AND e.merchant_id = ANY (w.merchants) AND e.event_type = ANY (w.event_types);
    IF FOUND THEN
        PERFORM pg_notify('webhook_deliveries', '');
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS refund_events_to_webhooks ON refund_events;
CREATE TRIGGER refund_events_to_webhooks
    AFTER INSERT ON refund_events
    REFERENCING NEW TABLE AS audited
    FOR EACH STATEMENT EXECUTE FUNCTION refund_events_to_webhooks();
