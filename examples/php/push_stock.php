<?php
// Back-office example: push stock changes from the ERP to stocksync over its HTTP API.
//
//   php push_stock.php --url http://127.0.0.1:2346 --token SECRET [--cacert cert.pem] [--run ID]
//
// (or STOCKSYNC_URL / STOCKSYNC_TOKEN). It sets a SKU (a stock count), books a goods receipt and
// a sale as one atomic batch, repeats that batch the way a retry after a timeout would (the
// idempotency key makes it a no-op), and tries to ship more than is available, which the
// server refuses with `insufficient_stock` (HTTP 409). Prints one line per step.

declare(strict_types=1);

require __DIR__ . '/StockSyncClient.php';

$options = getopt('', ['url:', 'token:', 'cacert:', 'run:']);
$url = $options['url'] ?? getenv('STOCKSYNC_URL') ?: 'http://127.0.0.1:2346';
$token = $options['token'] ?? getenv('STOCKSYNC_TOKEN') ?: '';
if ($token === '') {
    fwrite(STDERR, "a write token is needed: --token or STOCKSYNC_TOKEN\n");
    exit(2);
}
// Idempotency keys name business events; a run id keeps this demo's events apart between runs.
$run = $options['run'] ?? bin2hex(random_bytes(4));
$client = new StockSyncClient($url, $token, $options['cacert'] ?? null);

try {
    // 1. Stock count: the shelf holds 20 red shirts.
    $state = $client->apply('shirt-red', ['action' => 'set', 'quantity' => 20], "count-$run");
    echo "set shirt-red: quantity {$state['quantity']} (version {$state['version']})\n";

    // 2. Goods receipt of 5 blue shirts and a shop sale of 3 red ones, all or nothing.
    $receipt = [
        ['id' => 'shirt-blue', 'action' => 'increase', 'change' => 5],
        ['id' => 'shirt-red', 'action' => 'decrease', 'change' => 3],
    ];
    $result = $client->batch($receipt, "receipt-$run");
    foreach ($result['stock'] as $state) {
        echo "batch {$state['id']}: quantity {$state['quantity']}\n";
    }

    // 3. The same batch again, as a retry after a lost reply would send it: nothing changes.
    $again = $client->batch($receipt, "receipt-$run");
    echo 'retry: duplicate=' . ($again['duplicate'] ? 'true' : 'false')
        . ", shirt-red quantity {$again['stock'][1]['quantity']}\n";

    // 4. Shipping more than is available is refused; stock never goes negative.
    try {
        $client->apply('shirt-red', ['action' => 'decrease', 'change' => 1000], "ship-$run");
        echo "unexpected: the oversized shipment was accepted\n";
        exit(1);
    } catch (StockSyncError $e) {
        if ($e->errorCode !== 'insufficient_stock') {
            throw $e;
        }
        $now = $client->get('shirt-red');
        echo "refused: insufficient_stock (HTTP {$e->httpStatus}), shirt-red still {$now['quantity']}\n";
    }
} catch (StockSyncError $e) {
    fwrite(STDERR, "stocksync refused a request: {$e->getMessage()}\n");
    exit(1);
}
