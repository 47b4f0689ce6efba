-- wrk script: POST /stock/{sku} with a write token, cycling over 100 SKUs so the store,
-- not one hot SKU, is exercised. TOKEN comes from the environment.
local token = os.getenv("TOKEN") or "bench-write-token"
local counter = 0
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer " .. token
wrk.headers["Content-Type"] = "application/json"
local body = '{"action":"increase","change":1}'

request = function()
  counter = counter + 1
  return wrk.format(nil, "/stock/sku-" .. (counter % 100), nil, body)
end
