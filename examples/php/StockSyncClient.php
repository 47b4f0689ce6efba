<?php
// A small client for stocksync's HTTP API (docs/PROTOCOL.md "HTTP API"), plain PHP + curl.
//
// Every write may carry an idempotency key: pass one that names the business event (a goods
// receipt number, an order id), so that retrying after a timeout or a crash applies the change
// at most once. The server remembers keys for at least 24 hours.

declare(strict_types=1);

/** A request the server refused: `code` is the contract's error code (insufficient_stock, ...). */
final class StockSyncError extends RuntimeException
{
    public function __construct(
        public readonly int $httpStatus,
        public readonly string $errorCode,
        string $message,
        public readonly ?array $body = null,
    ) {
        parent::__construct("$errorCode ($httpStatus): $message");
    }
}

final class StockSyncClient
{
    /** Seconds to wait for the server; a write that times out may be retried with its key. */
    private const TIMEOUT_SECONDS = 10;

    /** @param ?string $caFile PEM file to trust for https:// (a self-signed certificate, say). */
    public function __construct(
        private readonly string $baseUrl,
        private readonly string $token,
        private readonly ?string $caFile = null,
    ) {
    }

    /** The state of one SKU: id, quantity, on_hand, reserved, version. */
    public function get(string $sku): array
    {
        return $this->request('GET', '/stock/' . rawurlencode($sku));
    }

    /** One op on one SKU, e.g. ['action' => 'set', 'quantity' => 20]; returns the new state. */
    public function apply(string $sku, array $op, ?string $idempotencyKey = null): array
    {
        $reply = $this->request('POST', '/stock/' . rawurlencode($sku), $op, $idempotencyKey);
        return $reply['stock'] + ['duplicate' => $reply['duplicate'] ?? false];
    }

    /**
     * Ops on any SKUs (each with its `id`), applied atomically: all or none. Returns the state
     * after the batch of each op's SKU, in order, and whether this was a repeat of a known key.
     */
    public function batch(array $ops, ?string $idempotencyKey = null): array
    {
        $reply = $this->request('POST', '/stock/batch', ['ops' => $ops], $idempotencyKey);
        return ['stock' => $reply['stock'], 'duplicate' => $reply['duplicate'] ?? false];
    }

    private function request(string $method, string $path, ?array $body = null, ?string $key = null): array
    {
        $headers = ['Authorization: Bearer ' . $this->token, 'Accept: application/json'];
        $curl = curl_init(rtrim($this->baseUrl, '/') . $path);
        $options = [
            CURLOPT_CUSTOMREQUEST => $method,
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_TIMEOUT => self::TIMEOUT_SECONDS,
            CURLOPT_CONNECTTIMEOUT => self::TIMEOUT_SECONDS,
        ];
        if ($body !== null) {
            $options[CURLOPT_POSTFIELDS] = json_encode($body, JSON_THROW_ON_ERROR);
            $headers[] = 'Content-Type: application/json';
        }
        if ($key !== null) {
            $headers[] = 'Idempotency-Key: ' . $key;
        }
        if ($this->caFile !== null) {
            $options[CURLOPT_CAINFO] = $this->caFile;
        }
        $options[CURLOPT_HTTPHEADER] = $headers;
        curl_setopt_array($curl, $options);
        $text = curl_exec($curl);
        if ($text === false) {
            $error = curl_error($curl);
            curl_close($curl);
            // Network trouble: the write may or may not have been applied. Retrying it with the
            // same idempotency key is safe.
            throw new StockSyncError(0, 'network', $error);
        }
        $status = (int) curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
        curl_close($curl);
        $reply = json_decode($text, true);
        if (!is_array($reply)) {
            throw new StockSyncError($status, 'bad_reply', 'not JSON: ' . substr($text, 0, 200));
        }
        if ($status !== 200) {
            $error = $reply['error'] ?? [];
            throw new StockSyncError(
                $status,
                (string) ($error['code'] ?? 'unknown'),
                (string) ($error['message'] ?? ''),
                $reply,
            );
        }
        return $reply;
    }
}
