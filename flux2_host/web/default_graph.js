// flux2 serve's canvas extension: the frontend's built-in default graph (an SD checkpoint, KSampler, ...) is
// swapped, before the frontend configures it, for a FLUX.2 graph on the models the server has
// (GET /flux2/default_workflow), so the canvas never opens a graph this host cannot run.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// The built-in default graph, recognised by its node ids and types (the frontend passes a copy of it).
function isBuiltInDefaultGraph(graph) {
  const builtIn = window.comfyAPI?.defaultGraph?.defaultGraph;
  if (!builtIn || !Array.isArray(graph?.nodes) || graph.nodes.length !== builtIn.nodes.length) return false;
  const signature = (g) => g.nodes.map((node) => `${node.id}:${node.type}`).sort().join(",");
  return signature(graph) === signature(builtIn);
}

app.registerExtension({
  name: "flux2.DefaultGraph",
  async beforeConfigureGraph(graphData) {
    if (!isBuiltInDefaultGraph(graphData)) return;
    const reply = await api.fetchApi("/flux2/default_workflow");
    if (!reply.ok) return;
    const flux2Graph = await reply.json();
    // In place: the frontend goes on with this object.
    for (const key of Object.keys(graphData)) delete graphData[key];
    Object.assign(graphData, flux2Graph);
  },
});
