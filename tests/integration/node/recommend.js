// Calls Recommend on a recship server using only the .proto files, and prints the response as JSON.
//
// Usage: node recommend.js <host:port> <proto root> <request JSON>
// keepCase keeps snake_case field names (retrieve_k, top_n); without it they are silently dropped.
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [target, protoRoot, requestJson] = process.argv.slice(2);
const definition = protoLoader.loadSync("recship/v1/recommender.proto", {
  includeDirs: [protoRoot],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
});
const recship = grpc.loadPackageDefinition(definition).recship.v1;
const client = new recship.Recommender(target, grpc.credentials.createInsecure());
const deadline = new Date(Date.now() + 30000);
client.Recommend(JSON.parse(requestJson), { deadline }, (error, response) => {
  if (error) {
    console.log(JSON.stringify({ code: error.code, details: error.details }));
    process.exitCode = 2;
  } else {
    console.log(JSON.stringify(response));
  }
  client.close();
});
