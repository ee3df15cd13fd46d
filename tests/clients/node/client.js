// Streams one chat generation from kiln-infer and prints each response as a JSON line.
// Usage: node client.js HOST:PORT API_KEY "question"
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "..", "protos");

function main() {
  const [address, apiKey, question] = process.argv.slice(2);
  const definition = protoLoader.loadSync("kiln/v1/inference.proto", {
    includeDirs: [PROTOS],
    keepCase: false,
    longs: Number,
    enums: String,
    defaults: true,
  });
  const kiln = grpc.loadPackageDefinition(definition).kiln.v1;
  const client = new kiln.InferenceService(address, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (apiKey) metadata.add("authorization", `Bearer ${apiKey}`);
  const request = {
    messages: [{ role: "user", content: question || "What is the capital of France?" }],
    sampling: { temperature: 0.0, maxTokens: 32 },
  };
  const deadline = new Date(Date.now() + 120000);
  const call = client.Generate(request, metadata, { deadline });
  call.on("data", (r) => process.stdout.write(JSON.stringify(r) + "\n"));
  call.on("error", (err) => {
    process.stderr.write(`error: ${err.code} ${err.details}\n`);
    process.exit(1);
  });
  call.on("end", () => client.close());
}

main();
