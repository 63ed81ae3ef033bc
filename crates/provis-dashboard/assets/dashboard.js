// Live events: the events page follows the master's subscription through
// server-sent events and puts each new one on top. Nothing else runs here.
(function () {
  const table = document.getElementById("events");
  if (!table || !table.dataset.stream) return;
  const body = table.querySelector("tbody");
  const state = document.getElementById("live-state");
  const source = new EventSource(table.dataset.stream);
  source.onopen = () => { state.textContent = "live"; };
  source.onerror = () => { state.textContent = "reconnecting…"; };
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    const row = document.createElement("tr");
    for (const text of [event.time, event.source, event.type, JSON.stringify(event.data)]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    }
    row.className = "new";
    body.insertBefore(row, body.firstChild);
    while (body.rows.length > 500) body.deleteRow(-1);
  };
})();
